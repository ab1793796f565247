"""Pretrain the base model: nanochat's `base_train.py` as an ordinary Accelerate program.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train/pretrain.py --preset d20   # the $100 run
    accelerate launch train/pretrain.py --preset tiny --data corpus.txt   # CPU, offline, minutes
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train/pretrain.py --preset tiny --data ...      # 2 CPU procs

(`accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up: accelerate hands multi-CPU
runs to mpirun, so torchrun is the way to test the distributed path on a laptop.)

Notable:
- One dial, `--depth`; the horizon follows a tokens:params ratio (20, Chinchilla, the seed) unless `--num-iterations`
  or `--target-flops` says otherwise. The total batch (524,288 tokens) never changes with the GPU count: gradient
  accumulation is derived from the world size.
- Muon for the block matrices, AdamW for embeddings/head/scalars (`training/optim.py`), LR/momentum schedules set
  by hand every step, as nanochat does. Accelerate owns processes, mixed precision, gradient sync and checkpoint state.
- Data: BOS-aligned best-fit packing (`hfnanochat.training.data`) over `--data-streams` fixed streams; each process owns
  streams r, r+W, ..., so 1 GPU and N GPUs see the same global batch at every step (and a run can resume on a
  different GPU count). The losses then agree to float rounding only: the gradient sums run in another order
  (all-reduce vs. accumulation), and Adam/Muon amplify that last-bit noise to ~1e-4 within a few steps.
- Checkpoints are written to a temporary folder and renamed into `OUT/checkpoints/step_NNNNNN` (a crash mid-write
  leaves the previous one intact; `--resume latest` skips a partial folder); `--resume` continues bit-exactly (model,
  optimizer, RNG, data position, smoothed loss) and rewrites `metrics.jsonl` from the checkpoint's step on.
- At the end: CORE of the final model on every process (`--core-max-per-task 500` as nanochat's training runs;
  `--core-bundle` offline, else the bundle is downloaded once), and a "pretrain" + "core" section in the run's
  report (`--report-dir`, default `OUT/../report`, so that the stages writing to out/pretrain, out/sft, ... share
  out/report/report.md; `--report-dir ''` writes none).
- Logs: progress bar with loss/bpb/tok/s/MFU, `OUT/metrics.jsonl` (one JSON object per step), trackers via
  `--report-to`. A non-finite loss, or non-finite weights at a save, stops the run (exit 1) and keeps the last good
  checkpoint.
"""

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM, config_for_depth
from hfnanochat.cli import (
    ArgumentParser,
    check_output,
    clear_output,
    fraction,
    main_entry,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from hfnanochat.evaluation.core import BundleError, download_bundle, evaluate_core
from hfnanochat.report import plot_curves, report_section, write_report
from hfnanochat.tokenizer import load_token_bytes
from hfnanochat.training.checkpoint import (
    checkpoint_model_as_hf_folder,
    find_checkpoint,
    last_good,
    save_checkpoint,
)
from hfnanochat.training.data import DEFAULT_DATA, DEFAULT_DATA_CONFIG, BOSBestFitLoader, DocumentStream, evaluate_bpb
from hfnanochat.training.export import save_final
from hfnanochat.training.metrics import append_jsonl, peak_flops, peak_memory_gib, truncate_metrics
from hfnanochat.training.optim import apply_schedule, build_optimizer

# fmt: off
PRESETS = {
    # the seed's tiers (8xH100 node): d20 is the $100 run, d26 the $300 run, d32 the $1000 run
    # Sized for 80 GB GPUs. The head + loss run in chunks of 8,192 tokens (the full fp32 logits of 32 x 2048 rows would
    # be 17 GB per copy). d20 at nanochat's 32 rows peaks at 74.8 GiB on an H100 (52.6% MFU); an activation budget of
    # 0.9 lets the compiler recompute cheap activations and peaks at 49.1 GiB for ~2.5 points of MFU (measured,
    # docs/benchmarks.md): headroom on an 80 GB card is worth more than that. `--activation-memory-budget 1` undoes it.
    # d26/d32 are scaled from the first figure (activations per row grow ~1.7x and ~2.6x, optimizer state ~2x and
    # ~3.4x), not measured; gradient accumulation keeps the total batch whatever the device batch.
    "d20": dict(depth=20, device_batch_size=32, loss_chunk_size=8192, activation_memory_budget=0.9),
    "d26": dict(depth=26, device_batch_size=8, loss_chunk_size=8192),
    "d32": dict(depth=32, device_batch_size=4, loss_chunk_size=8192),
    # a CPU-sized run for laptops and CI: same code path, 60 steps of a depth-4 model on 256-token rows
    "tiny": dict(depth=4, max_seq_len=256, device_batch_size=4, total_batch_size=4 * 256 * 4, num_iterations=60,
                 eval_every=20, eval_tokens=4 * 256 * 2, sample_every=60, save_every=30, compile=False),
}
# fmt: on
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for a tier; explicit flags win")
    # model
    p.add_argument("--depth", type=positive_int, default=20, help="layers; width = 64 * depth")
    p.add_argument("--max-seq-len", type=positive_int, default=2048)
    p.add_argument("--window-pattern", default="L", help="2026 sliding windows, e.g. SSSL (L = full context)")
    p.add_argument(
        "--arch-2026",
        action="store_true",
        help="value embeddings, residual scalars, qk x1.2, smear, backout, RoPE 100k",
    )
    # batch and horizon
    p.add_argument("--device-batch-size", type=positive_int, default=32, help="rows per GPU per micro-step")
    p.add_argument("--total-batch-size", type=positive_int, default=524288, help="tokens per optimizer step (2**19)")
    p.add_argument(
        "--num-iterations", type=positive_int, default=None, help="explicit number of steps (overrides the rest)"
    )
    p.add_argument("--target-flops", type=positive_float, default=None, help="horizon from a FLOP budget")
    p.add_argument(
        "--target-param-data-ratio", type=positive_float, default=20.0, help="tokens per parameter (Chinchilla 20)"
    )
    # optimizer (nanochat's seed values)
    p.add_argument("--matrix-lr", type=non_negative_float, default=0.02, help="Muon")
    p.add_argument("--embedding-lr", type=non_negative_float, default=0.2, help="AdamW, scaled by (d/768)^-0.5")
    p.add_argument("--unembedding-lr", type=non_negative_float, default=0.004, help="AdamW, scaled by (d/768)^-0.5")
    p.add_argument("--scalar-lr", type=non_negative_float, default=0.5, help="AdamW, 2026 scalars")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="Muon weight decay (seed: 0)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="linear decay over the last fraction of steps")
    p.add_argument("--final-lr-frac", type=non_negative_float, default=0.0)
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="0 disables")
    p.add_argument(
        "--loss-chunk-size",
        type=non_negative_int,
        default=0,
        help="compute head + loss this many tokens at a time (saves the fp32 logits' memory); 0: off",
    )
    # data
    p.add_argument("--data", default=DEFAULT_DATA, help="Hub dataset id or local txt/jsonl/parquet path")
    p.add_argument("--data-name", default=None, help="config name of a Hub dataset (FineWeb-EDU: sample-10BT)")
    p.add_argument("--text-column", default="text")
    p.add_argument(
        "--data-streams", type=positive_int, default=None, help="fixed data shards (default: the world size)"
    )
    p.add_argument("--tokenizer", default="out/tokenizer", help="folder written by train/tokenizer.py")
    # evaluation, checkpoints, logging
    p.add_argument(
        "--eval-every", type=non_negative_int, default=250, help="validation bpb every N steps (0: only at the end)"
    )
    p.add_argument("--eval-tokens", type=positive_int, default=20 * 524288, help="validation tokens per evaluation")
    p.add_argument(
        "--eval-device-batch-size",
        type=positive_int,
        default=None,
        help="rows per evaluation forward (default: --device-batch-size; lower it for a small corpus)",
    )
    p.add_argument("--sample-every", type=non_negative_int, default=2000, help="greedy samples from fixed prompts")
    p.add_argument(
        "--save-every", type=non_negative_int, default=1000, help="checkpoint every N steps (and at the end)"
    )
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, help="how many step checkpoints to keep")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (default: refuse to)")
    p.add_argument("--out", default="out/pretrain")
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none")
    p.add_argument(
        "--activation-memory-budget",
        type=fraction,
        default=1.0,
        help="compiled runs: fraction of activation memory to keep (below 1 recomputes some in backward)",
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on GPU)"
    )
    p.add_argument("--core", action=argparse.BooleanOptionalAction, default=True, help="CORE of the final model")
    p.add_argument("--core-bundle", default=None, help="CORE eval bundle folder (default: download it once)")
    p.add_argument("--core-max-per-task", type=int, default=500, help="CORE examples per task (nanochat: 500)")
    p.add_argument("--report-dir", default=None, help="report sections go here (default: OUT/../report; '' = none)")
    p.add_argument("--seed", type=int, default=42)
    # A preset replaces the defaults, so every flag given on the command line still wins, in any spelling argparse
    # accepts (--depth 2, --depth=2, an abbreviation).
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def model_config(args, tokenizer) -> HFNanoChatConfig:
    options = {}
    if args.arch_2026:
        options = dict(
            value_embeddings=True,
            residual_scalars=True,
            qk_scale=1.2,
            smear=True,
            backout=True,
            init_scheme="2026",
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )
    return config_for_depth(
        args.depth,
        vocab_size=len(tokenizer),
        max_seq_len=args.max_seq_len,
        window_pattern=args.window_pattern,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )


def num_steps(args, model, flops_per_token) -> int:
    # precedence as nanochat: explicit steps > FLOP budget > tokens:params ratio
    if args.num_iterations is not None:
        return args.num_iterations
    if args.target_flops is not None:
        return round(args.target_flops / (flops_per_token * args.total_batch_size))
    params = sum(p.numel() for p in model.parameters())
    return round(args.target_param_data_ratio * params / args.total_batch_size)


# config field -> the flag that sets it, so that a mismatch says what to change
RESUME_FIELDS = {
    "vocab_size": "--tokenizer",
    "hidden_size": "--depth",
    "num_hidden_layers": "--depth",
    "num_attention_heads": "--depth",
    "num_key_value_heads": "--depth",
    "max_position_embeddings": "--max-seq-len",
    "window_pattern": "--window-pattern",
    "value_embeddings": "--arch-2026",
    "residual_scalars": "--arch-2026",
    "smear": "--arch-2026",
    "backout": "--arch-2026",
}


def check_resume_config(path: Path, config: HFNanoChatConfig, args):
    saved = HFNanoChatConfig.from_pretrained(path / "model")
    diff = [
        f"{f} ({flag}): checkpoint {getattr(saved, f)!r} vs now {getattr(config, f)!r}"
        for f, flag in RESUME_FIELDS.items()
        if getattr(saved, f) != getattr(config, f)
    ]
    state = json.loads((path / "trainer_state.json").read_text())
    for key in ("total_batch_size", "max_seq_len", "data_streams"):
        if state["args"][key] != getattr(args, key):
            diff.append(f"{key}: checkpoint {state['args'][key]!r} vs now {getattr(args, key)!r}")
    if diff:
        raise ValueError(f"--resume {path}: the checkpoint does not match this run's settings: " + "; ".join(diff))
    return state


def evaluate(model, raw_model, accelerator, make_val_loader, streams: list[int], token_bytes, args) -> float:
    """Validation bits per byte over `--eval-tokens` tokens, the same tokens at every evaluation."""
    model.eval()
    rows = args.eval_device_batch_size or args.device_batch_size
    eval_steps = max(1, args.eval_tokens // (rows * args.max_seq_len * args.data_streams))
    # A fresh validation loader every time, so every evaluation sees the same tokens. Every stream contributes the
    # same number of batches (the smallest any stream has), so the evaluation set does not depend on how streams are
    # spread over processes, and every rank runs the same number of forwards (FSDP needs that).
    per_stream = [list(itertools.islice(make_val_loader(s, rows), eval_steps)) for s in streams]
    n = torch.tensor(min(len(b) for b in per_stream), device=accelerator.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
    if n.item() == 0:
        raise ValueError(
            f"the validation split of {args.data} is too small for one batch of {rows} x {args.max_seq_len} "
            "tokens: evaluate on fewer rows at a time with --eval-device-batch-size"
        )
    batches = [batch for stream_batches in per_stream for batch in stream_batches[: n.item()]]
    with torch.no_grad(), accelerator.autocast():
        bpb = evaluate_bpb(raw_model, batches, token_bytes)
    model.train()
    return bpb


def sample(raw_model, tokenizer, accelerator) -> None:
    """Greedy continuations of SAMPLE_PROMPTS, printed."""
    raw_model.eval()
    for prompt in SAMPLE_PROMPTS:
        ids = [[tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)]
        with torch.no_grad(), accelerator.autocast():
            outp = raw_model.generate(
                torch.tensor(ids, device=accelerator.device),
                max_new_tokens=16,
                do_sample=False,
                use_cache=True,
                eos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        accelerator.print(f"  {tokenizer.decode(outp[0, 1:])!r}")
    raw_model.train()


def weights_are_finite(raw_model, accelerator) -> bool:
    # Each rank checks what it holds (all weights under DDP, its shards under FSDP); the verdict is shared so that
    # every rank saves, or stops, together.
    local = [p.to_local() if isinstance(p, DTensor) else p for p in raw_model.parameters()]
    finite = torch.tensor(float(all(torch.isfinite(p).all() for p in local)), device=accelerator.device)
    return accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    # Below 1, the compiler's partitioner recomputes in the backward pass whatever activations it takes to keep
    # the saved ones under this fraction of what it would save otherwise (d20 at 32 rows on an H100: 0.9 -> 49
    # instead of 75 GiB for ~2.5 points of MFU, docs/benchmarks.md): a way to fit a GPU with less memory besides
    # fewer rows.
    torch._functorch.config.activation_memory_budget = args.activation_memory_budget
    out = Path(args.out)
    replace = check_output(out, resume=args.resume is not None, overwrite=args.overwrite, what="pretraining run")
    accelerator = Accelerator(
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(out),
        # the model's buffers are constant RoPE tables (and an inference-only q/k/v stack): DDP need not re-send them
        # from rank 0 before every forward
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.data_streams = args.data_streams or world
    set_seed(args.seed)

    # -- validate everything cheap before any GPU time is spent ---------------------------------------------------
    tokens_per_micro = args.device_batch_size * args.max_seq_len
    if args.data_streams % world:
        raise ValueError(f"--data-streams {args.data_streams} must be a multiple of the {world} processes")
    if args.total_batch_size % (tokens_per_micro * world):
        raise ValueError(
            f"--total-batch-size {args.total_batch_size} is not divisible by device batch {args.device_batch_size} x "
            f"seq {args.max_seq_len} x {world} processes = {tokens_per_micro * world} tokens per micro-step"
        )
    grad_accum = args.total_batch_size // (tokens_per_micro * world)
    # Accelerate's accumulate() syncs, clips and steps only on every grad_accum-th micro-step (and backward divides the
    # loss by it); left at its default of 1, every micro-step would be an optimizer step of its own.
    accelerator.gradient_accumulation_steps = grad_accum
    streams = list(range(rank, args.data_streams, world))
    if grad_accum % len(streams):
        raise ValueError(
            f"gradient accumulation {grad_accum} must be a multiple of the {len(streams)} data streams per process"
        )
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise ValueError(
            f"--tokenizer {args.tokenizer} holds no tokenizer.json; "
            f"train one with train/tokenizer.py --out {args.tokenizer}"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    token_bytes = load_token_bytes(args.tokenizer).to(device)
    config = model_config(args, tokenizer)
    resume_path = find_checkpoint(out, args.resume, accelerator.print) if args.resume else None
    resume_state = check_resume_config(resume_path, config, args) if resume_path else None

    if args.data == DEFAULT_DATA and args.data_name is None:
        args.data_name = DEFAULT_DATA_CONFIG

    def make_loader(split, stream, num_streams, rows=args.device_batch_size):
        documents = DocumentStream(
            args.data,
            split=split,
            text_column=args.text_column,
            name=args.data_name,
            rank=stream,
            world_size=num_streams,
        )
        return BOSBestFitLoader(tokenizer, documents, rows, args.max_seq_len, device=device)

    train_loaders = [make_loader("train", s, args.data_streams) for s in streams]  # raises on bad --data/column

    # -- model and optimizer --------------------------------------------------------------------------------------
    model = HFNanoChatForCausalLM.from_config_on_device(config, device)
    model.config.use_cache = False
    flops_per_token = model.estimate_flops(args.max_seq_len)
    steps = num_steps(args, model, flops_per_token)
    optimizer = build_optimizer(
        model,
        matrix_lr=args.matrix_lr,
        embedding_lr=args.embedding_lr,
        unembedding_lr=args.unembedding_lr,
        scalar_lr=args.scalar_lr,
        weight_decay=args.weight_decay,
    )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if args.compile and fsdp:
        # FSDP2 gathers the root's own weights (embeddings, head) in the root module's forward hook. Seen on 2 H200s
        # (torch 2.11): with the compiled wrapper inside FSDP, evaluation through the plain module met sharded
        # weights; with it outside, the compiled training forward did. Until a compiled FSDP2 step is measured,
        # FSDP runs eager.
        accelerator.print("FSDP: running uncompiled (whole-model torch.compile does not yet work with FSDP2 here)")
        args.compile = False
    if args.compile:
        # DDP wraps the compiled model: one backward graph; under accumulation the gradient all-reduce happens once
        # per optimizer step anyway
        model = torch.compile(model, dynamic=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    # the plain module: evaluation and sampling run uncompiled (as nanochat's orig_model), and its state dict has no
    # torch.compile `_orig_mod.` prefixes. accelerate's unwrap leaves the compiled wrapper that sits inside DDP.
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    raw_model = getattr(raw_model, "_orig_mod", raw_model)

    full_state_dict = checkpoint_model_as_hf_folder(accelerator, model, raw_model, fsdp)

    step, smooth_loss, total_time, val_bpb = 0, 0.0, 0.0, None
    if resume_state:
        # The checkpoint's optimizer state carries its own base rates; the ones built from this run's flags win, so
        # that a run that diverged can resume from its last good checkpoint with lower learning rates.
        fresh = [(g["initial_lr"], g.get("initial_weight_decay")) for g in optimizer.param_groups]
        accelerator.load_state(str(resume_path))
        for group, (initial_lr, initial_wd) in zip(optimizer.param_groups, fresh):
            group["initial_lr"] = initial_lr
            if initial_wd is not None:
                group["initial_weight_decay"] = initial_wd
        # load_state restores Accelerate's micro-step counter, which counts in the checkpoint's grad_accum; a
        # checkpoint sits on a step boundary, so count from 0 (a run on another process count has another grad_accum)
        accelerator.step = 0
        for s, loader in zip(streams, train_loaders):
            loader.load_state_dict(torch.load(resume_path / f"data_stream{s}.pt", weights_only=False))
        step, smooth_loss, total_time = resume_state["step"], resume_state["smooth_loss"], resume_state["total_time"]
        val_bpb = resume_state["val_bpb"]  # logged with every step until the next evaluation, as in the unbroken run
        accelerator.print(f"resumed from {resume_path} at step {step}")

    n_params = sum(p.numel() for p in raw_model.parameters())
    peak = peak_flops(device)
    accelerator.print(
        f"model: depth {args.depth}, width {config.hidden_size}, {n_params:,} parameters, "
        f"{flops_per_token:.3e} FLOPs/token | {world} process(es) ({accelerator.distributed_type.value}), "
        f"grad accumulation {grad_accum}, "
        f"{steps} steps x {args.total_batch_size:,} tokens = {steps * args.total_batch_size:,} tokens"
    )
    accelerator.init_trackers(
        "hfnanochat-pretrain",
        config={k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))},
    )
    metrics_file = out / "metrics.jsonl"
    if accelerator.is_main_process:
        if replace:  # --overwrite: checked up front, done only now that the new run is ready to start
            clear_output(out)
        out.mkdir(parents=True, exist_ok=True)
        if metrics_file.exists():
            truncate_metrics(metrics_file, step)

    def make_val_loader(stream: int, rows: int) -> BOSBestFitLoader:
        return make_loader("val", stream, args.data_streams, rows)

    def stop(reason: str):
        bar.close()  # stop() is only called from inside the loop, where the bar exists
        for loader in train_loaders:
            loader.close()
        good = last_good(out)
        accelerator.print(
            f"{reason}; stopping. The last good checkpoint is "
            + (f"{good}: resume from it with a lower LR" if good else "none: none was saved yet")
        )
        accelerator.end_training()
        sys.exit(1)

    def save():
        if not weights_are_finite(raw_model, accelerator):
            stop(f"step {step}: the weights are not finite (the last update overflowed), so they are not saved")

        def data_positions(folder: Path):  # per stream, so every rank writes its own
            for s, loader in zip(streams, train_loaders):
                torch.save(loader.state_dict(), folder / f"data_stream{s}.pt")

        state = dict(step=step, smooth_loss=smooth_loss, total_time=total_time, val_bpb=val_bpb, args=vars(args))
        save_checkpoint(accelerator, out, step, args.keep_checkpoints, data_positions, state)

    # -- the loop -------------------------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=steps, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True, desc="pretrain")
    while True:
        last_step = step == steps
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0) or (last_step and args.eval_every <= 0):
            val_bpb = evaluate(model, raw_model, accelerator, make_val_loader, streams, token_bytes, args)
            accelerator.print(f"step {step:05d} | validation bpb {val_bpb:.4f}")
            accelerator.log({"val/bpb": val_bpb}, step=step)
        # samples come from the main process; under FSDP every rank must join the sharded forwards (same greedy
        # tokens everywhere, so the same number of them)
        if (
            (accelerator.is_main_process or fsdp)
            and args.sample_every > 0
            and (last_step or (step > 0 and step % args.sample_every == 0))
        ):
            sample(raw_model, tokenizer, accelerator)
        if step > 0 and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            if not (resume_state and step == resume_state["step"]):
                save()
        if last_step:
            break

        schedule = apply_schedule(
            optimizer,
            step,
            steps,
            warmup_steps=args.warmup_steps,
            warmdown_ratio=args.warmdown_ratio,
            final_lr_frac=args.final_lr_frac,
        )
        t0 = time.time()
        step_loss = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = next(train_loaders[micro % len(streams)])
            with accelerator.accumulate(model), accelerator.autocast():
                # the loader already shifted y
                loss = model(input_ids=x, shift_labels=y, use_cache=False, loss_chunk_size=args.loss_chunk_size).loss
                step_loss += loss.detach() / grad_accum
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step_loss = accelerator.reduce(step_loss, reduction="mean").item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        if not math.isfinite(step_loss):
            stop(f"step {step + 1}: loss is {step_loss}")
        step += 1
        if step > 10:  # like nanochat, the first steps (compilation, warm-up) don't count towards training time
            total_time += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * step_loss
        debiased = smooth_loss / (1 - 0.9**step)
        tok_per_sec = args.total_batch_size / dt
        mfu = 100 * flops_per_token * tok_per_sec / (peak * world) if peak else None
        record = dict(
            step=step,
            loss=step_loss,
            smooth_loss=debiased,
            lrm=schedule["lrm"],
            dt=dt,
            tok_per_sec=tok_per_sec,
            mfu=mfu,
            val_bpb=val_bpb,
            total_time=total_time,
            peak_mem_gib=peak_memory_gib(device),
        )
        if accelerator.is_main_process:
            append_jsonl(metrics_file, record)
        accelerator.log({f"train/{k}": v for k, v in record.items() if v is not None}, step=step)
        bar.set_postfix_str(
            f"loss {debiased:.4f} | bpb {val_bpb or float('nan'):.4f} | {tok_per_sec:,.0f} tok/s"
            + (f" | MFU {mfu:.1f}%" if mfu is not None else "")
        )
        bar.update(1)
    bar.close()
    for loader in train_loaders:
        # the tokenizer threads read ahead: stopped here, not left inside the Rust tokenizer at interpreter exit
        # (which aborts the process: "terminate called without an active exception")
        loader.close()

    # -- final HF folder: weights, config, tokenizer + chat template, generation defaults ----------------------------
    final_dir = out / "final"
    state_dict = full_state_dict()
    if accelerator.is_main_process:
        save_final(raw_model, tokenizer, final_dir, state_dict=state_dict)
        memory = peak_memory_gib(device)
        accelerator.print(
            f"saved {final_dir} | validation bpb {val_bpb:.4f} | training time {total_time / 60:.1f} min"
            + (f" | peak memory {memory:.1f} GiB" if memory is not None else "")
        )
    accelerator.wait_for_everyone()
    report_dir = out.parent / "report" if args.report_dir is None else args.report_dir
    if report_dir and accelerator.is_main_process:
        curve = plot_curves(metrics_file, Path(report_dir) / "pretrain_loss.png", ["smooth_loss", "val_bpb"])
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        config |= dict(parameters=n_params, steps=steps, flops_per_token=flops_per_token)
        report_section(
            report_dir, "pretrain", config=config, metrics=dict(val_bpb=val_bpb, training_time_s=total_time),
            wall_time_s=time.time() - started, tokens=steps * args.total_batch_size,
            curves={"training loss and validation bpb": curve} if curve else None,
            peak_memory_gib=peak_memory_gib(device),
        )  # fmt: skip
    if args.core:
        # every rank evaluates a share of the examples; under FSDP each loads the full final model for it
        core_model = HFNanoChatForCausalLM.from_pretrained(final_dir).to(device) if fsdp else raw_model
        if device.type == "cuda":  # the CORE section's peak is the evaluation's, on top of what training still holds
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        try:
            bundle = Path(args.core_bundle) if args.core_bundle else download_bundle()
            core = evaluate_core(core_model, tokenizer, bundle, max_per_task=args.core_max_per_task)
        except (BundleError, OSError) as e:  # training is done and saved; CORE can be rerun with eval/core.py
            accelerator.print(f"CORE skipped: {e}")
        else:
            accelerator.print(f"CORE {core['core']:.4f} ({args.core_max_per_task} examples per task)")
            if report_dir and accelerator.is_main_process:
                metrics = {"CORE": core["core"]} | {k: v["centered"] for k, v in core["tasks"].items()}
                config = dict(
                    model=str(final_dir), max_per_task=args.core_max_per_task, skipped=core["skipped"] or "none"
                )
                report_section(
                    report_dir, "core", config=config, metrics=metrics, column="BASE", wall_time_s=time.time() - t0,
                    peak_memory_gib=peak_memory_gib(device),
                )  # fmt: skip
    if report_dir and accelerator.is_main_process:
        write_report(report_dir)
    accelerator.end_training()


if __name__ == "__main__":
    main_entry(main)
