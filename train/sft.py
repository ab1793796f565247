"""Chat training on TRL's `SFTTrainer`: nanochat's mid-training (`--mixture mid`) and chat SFT (`--mixture sft`, the
default), one script with two data mixtures, as nanochat's own chat SFT script now does.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train/sft.py --mixture mid \
        --model out/pretrain/final --out out/mid
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train/sft.py --model out/mid/final --out out/sft
    python train/sft.py --mixture mid --preset tiny --model out/pretrain/final --out out/mid   # CPU, offline, minutes
    python train/sft.py --preset tiny --model out/mid/final --out out/sft

Notable, `--mixture mid` (nanochat's mid_train.py):
- The seed's mixture: SmolTalk 460K + MMLU auxiliary-train 100K + GSM8K 8K = 568K conversations, shuffled together,
  one epoch; `--identity` adds 2 x 1K identity conversations and `--spelling` SimpleSpelling 200K + SpellingBee 80K
  (nanochat's later mixture).
- Rendered with our chat template (GSM8K's calculator calls become `<|python_start|>...<|output_end|>` blocks) and
  concatenated into one token stream cut into full `--max-seq-len` rows (TRL's "wrapped" packing): like the seed,
  attention runs across conversation boundaries and every token is trained, user turns included. `--assistant-only`
  trains only what the assistant writes (the SFT mask).
- The base model's optimizer: Muon + AdamW at the base rates, Muon momentum 0.85 -> 0.95 over 300 steps. The LR is
  flat, then decays linearly to 0 over the last 20% of the steps. (The seed's code computed `progress + (1 -
  progress) * final_lr_frac`, which *rises* to 1 over the epoch; its later versions use this warm-down, so do we.)
- 524,288 tokens per step (`--total-batch-size`) whatever the GPU count: gradient accumulation comes from the world
  size, as pretraining.
- Differences from the seed: no validation bpb during training; each row loses the target of its first token (HF
  shifts inside a row; nanochat reads T+1 tokens); TRL packs 1,000 conversations at a time, so one row in every few
  hundred is short and padded; conversations longer than a row are not cropped to 2048 tokens first; the loss of a
  step is normalised by its total token count, where nanochat averages per micro-batch.

Notable, `--mixture sft` (nanochat's chat_sft.py):
- The seed's mixture: ARC-Easy 2.3K + ARC-Challenge 1.1K + GSM8K 8K + the first 10K SmolTalk conversations = 21.4K,
  shuffled together, one epoch (~670 steps); `--identity` adds 1K identity conversations and `--spelling`
  SimpleSpelling 300 + SpellingBee 300 (nanochat's later mixture).
- One conversation per row, right-padded with `<|assistant_end|>` (never trained), no packing: the model sees each
  conversation alone, as at inference.
- Loss only on what the assistant writes: its text, its python calls and `<|assistant_end|>`; user turns, tool outputs
  (the calculator writes those) and padding are masked. TRL takes the mask from the `{% generation %}` blocks of our
  chat template, which equal `render_conversation`'s mask token for token (tests/test_sft.py checks the batches).
- Conversations longer than the context are dropped (counted in the log; an error in your own `--data`), where
  nanochat crops them and can cut the answer off.
- 32 conversations per step (`--examples-per-step`) whatever the GPU count. Muon + AdamW at 0.02 x the base rates
  (`--lr-scale`), decaying linearly to 0 over the epoch; Muon momentum fixed at 0.95.
- Differences from the seed: the loss of a step is normalised by its total count of trained tokens (nanochat averages
  per micro-batch), and TRL's sampler order differs from nanochat's.

Both:
- `--data` trains on your own JSONL instead; `--source gsm8k=DIR` reads a local copy of a public dataset.
  `--max-rows N` stops every part at its share of N: a quick run keeps the mixture's proportions.
- Optimizers: Muon + AdamW at nanochat's rates (`MuonAdamWFactory` through `optimizer_cls_and_kwargs`, built after
  the model is wrapped), or transformers' AdamW at one rate (`--optimizer adamw`), or LoRA adapters (PEFT) trained
  with AdamW. No gradient clipping: nanochat clips only in pretraining. A rate flag the chosen optimizer would
  ignore (`--lr` with Muon, `--matrix-lr` with AdamW, `--lora-rank` without `--lora`) is a ValueError.
- Checkpoints (model, optimizer, scheduler, RNG, data position) every `--save-every` steps; `--resume` continues.
  Logs: progress bar, `OUT/metrics.jsonl`, trackers via `--report-to`. Output: `OUT/final`, an HF folder.
"""

import argparse
import functools
import os
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig
from trl import SFTConfig

from hfnanochat import tasks
from hfnanochat.cli import (
    ArgumentParser,
    check_output,
    clear_output,
    fraction,
    main_entry,
    model_folder,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from hfnanochat.training.optim import MuonAdamWFactory
from hfnanochat.training.sft import (
    LORA_TARGETS,
    SOURCES,
    MetricsCallback,
    NanochatSFTTrainer,
    compile_backbone,
    head,
    load_model,
    load_parts,
    resume_checkpoint,
    train_and_save,
    world_size,
)

RECOMPUTE_FIELD = (
    "activation_checkpointing"
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__
    else "gradient_checkpointing"
)
# What differs between the two mixtures: data, batch shape, rates and schedule. Explicit flags win.
MIXTURES = {
    "mid": dict(
        device_batch_size=32,
        total_batch_size=524288,  # tokens per optimizer step (2**19), packed rows
        adamw_lr=1e-4,  # AdamW's usual rate for continued pretraining
        lr_scale=1.0,  # the base model's rates
        warmdown_ratio=0.2,
        momentum_warmup_steps=300,
        assistant_only=False,
        identity_copies=2,
        spelling_sizes=(200_000, 80_000),
    ),
    "sft": dict(
        device_batch_size=4,
        examples_per_step=32,  # conversations per optimizer step, one per row
        adamw_lr=2e-5,  # TRL's default fine-tuning rate
        lr_scale=0.02,  # the seed's
        warmdown_ratio=1.0,  # nanochat's `1 - step / num_iterations`
        momentum_warmup_steps=0,  # Muon momentum fixed at 0.95
        assistant_only=True,
        identity_copies=1,
        spelling_sizes=(300, 300),
    ),
}
PRESETS = {
    # offline and CPU-sized: the generated tasks only, 256-token rows
    ("mid", "tiny"): dict(recipe=False, identity=True, spelling=True, max_rows=128, max_seq_len=256,
                          device_batch_size=4, total_batch_size=8 * 256, save_every=0, num_proc=1),
    ("sft", "tiny"): dict(recipe=False, identity=True, spelling=True, max_rows=64, max_seq_len=256,
                          device_batch_size=4, examples_per_step=8, save_every=0, num_proc=1),
}  # fmt: skip


def recipe(mixture: str, sources: dict, num_proc: int) -> list[tuple[str, int, object]]:
    """(name, conversations in the full recipe, load(stop)) of the mixture's public datasets."""

    def part(loader, task: str, *task_args, default_stop=None):
        return lambda stop: loader(*task_args, stop=stop or default_stop, num_proc=num_proc, **sources[task])

    if mixture == "mid":
        return [
            ("SmolTalk", 460_000, part(tasks.smoltalk, "smoltalk", "train")),
            # multiple-choice questions from ARC, MC_TEST, OBQA, RACE
            ("MMLU", 100_000, part(tasks.mmlu, "mmlu", "auxiliary_train", "train")),
            # math problems that teach the calculator tool
            ("GSM8K", 8_000, part(tasks.gsm8k, "gsm8k", "main", "train")),
        ]
    return [
        ("ARC-Easy", 2_300, part(tasks.arc, "arc", "ARC-Easy", "train")),
        ("ARC-Challenge", 1_100, part(tasks.arc, "arc", "ARC-Challenge", "train")),
        # math problems with calculator calls
        ("GSM8K", 8_000, part(tasks.gsm8k, "gsm8k", "main", "train")),
        # the first 10K of SmolTalk's 460K general conversations
        ("SmolTalk", 10_000, part(tasks.smoltalk, "smoltalk", "train", default_stop=10_000)),
    ]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixture", choices=sorted(MIXTURES), default="sft", help="mid-training or chat SFT")
    p.add_argument("--preset", choices=sorted({name for _, name in PRESETS}), default=None,
                   help="defaults for a tier; explicit flags win")  # fmt: skip
    p.add_argument("--model", required=True, help="HF folder of the previous stage (loaded with trust_remote_code)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, final/ (the HF folder)")
    p.add_argument("--max-seq-len", type=positive_int, default=None, help="row length (None: the model's context)")
    # data
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="your own JSONL file(s) of conversations, used instead of the public datasets",
    )
    p.add_argument(
        "--recipe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the mixture's public datasets (--no-recipe: only --data / --identity / --spelling)",
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help=f"local copy (file or folder) of a public dataset, TASK in {', '.join(SOURCES)}",
    )
    p.add_argument("--identity", action="store_true", help="add identity conversations (who the model is)")
    p.add_argument(
        "--identity-name",
        default=None,
        help="the name the generated identity conversations give the model (None: nanochat)",
    )
    p.add_argument("--identity-file", default=None, help="JSONL of identity conversations instead of the generated")
    p.add_argument("--spelling", action="store_true", help="add nanochat's SimpleSpelling + SpellingBee tasks")
    p.add_argument(
        "--max-rows",
        type=positive_int,
        default=None,
        help="train on at most this many conversations, each part of the mixture cut to its share of them (quick runs)",
    )
    p.add_argument(
        "--num-proc",
        type=positive_int,
        default=max(1, min(16, (os.cpu_count() or 2) // 2)),
        help="processes for dataset preparation (568K conversations take minutes on one)",
    )
    # optimizer
    p.add_argument(
        "--optimizer",
        choices=["muon", "adamw"],
        default=None,
        help="muon: Muon + AdamW at nanochat's rates (the default); adamw: one AdamW at --lr (the default with --lora)",
    )
    # None = not given: the Muon rates default to build_optimizer's, and a rate the optimizer would ignore raises
    p.add_argument(
        "--matrix-lr", type=non_negative_float, default=None, help="--optimizer muon: Muon's rate (None: 0.02)"
    )
    p.add_argument(
        "--embedding-lr",
        type=non_negative_float,
        default=None,
        help="--optimizer muon: AdamW rate of the embeddings, scaled by (d/768)^-0.5 (None: 0.2)",
    )
    p.add_argument(
        "--unembedding-lr",
        type=non_negative_float,
        default=None,
        help="--optimizer muon: AdamW rate of lm_head, scaled by (d/768)^-0.5 (None: 0.004)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=None, help="--optimizer adamw rate (None: the mixture's; LoRA 10x)"
    )
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights")
    p.add_argument("--lora-rank", type=positive_int, default=None, help="--lora: adapter rank (None: 16)")
    p.add_argument("--lora-alpha", type=positive_int, default=None, help="--lora: adapter scale alpha/rank (None: 32)")
    # run
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: mid-training on a GPU; SFT's padded rows compile twice, static then dynamic)",
    )
    p.add_argument(
        "--dataloader-workers",
        type=non_negative_int,
        default=None,
        help="processes that collate batches ahead of the GPU (default: 2 on a GPU, 0 on CPU)",
    )
    p.add_argument(
        "--save-every", type=non_negative_int, default=500, help="checkpoint every N steps (0: no checkpoints)"
    )
    p.add_argument("--keep-checkpoints", type=positive_int, default=2)
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (default: refuse to)")
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-batch-size", type=positive_int, help="rows per GPU per micro-step")
    p.add_argument(
        "--total-batch-size", type=positive_int, default=None, help="--mixture mid: tokens per optimizer step"
    )
    p.add_argument("--examples-per-step", type=positive_int, default=None, help="--mixture sft: conversations per step")
    p.add_argument("--warmdown-ratio", type=fraction, help="linear LR decay over the last fraction of steps")
    p.add_argument(
        "--momentum-warmup-steps", type=non_negative_int, help="Muon momentum 0.85 -> 0.95 over this many steps"
    )
    p.add_argument("--lr-scale", type=positive_float, default=None,
                   help="--optimizer muon: every rate is this x the base model's (mid 1.0, sft 0.02)")  # fmt: skip
    p.add_argument("--assistant-only", action=argparse.BooleanOptionalAction,
                   help="loss on assistant tokens only (sft: always; mid: default off)")  # fmt: skip
    known = p.parse_known_args(argv)[0]
    defaults = {k: v for k, v in MIXTURES[known.mixture].items()}
    if known.preset:
        if (known.mixture, known.preset) not in PRESETS:
            p.error(f"--preset {known.preset} has no --mixture {known.mixture} variant")
        preset = PRESETS[known.mixture, known.preset]
        if known.data:
            # your own data is what you asked to train on: the preset's generated tasks stay out unless you add
            # them (--identity, --spelling), and so does its row cap
            preset = {k: v for k, v in preset.items() if k not in ("identity", "spelling", "max_rows")}
        defaults.update(preset)
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    wrong = "examples_per_step" if args.mixture == "mid" else "total_batch_size"
    if getattr(args, wrong) is not None:
        flag = "--" + wrong.replace("_", "-")
        right = "--total-batch-size (tokens)" if args.mixture == "mid" else "--examples-per-step (conversations)"
        p.error(f"{flag} does not apply to --mixture {args.mixture}: its batch is set by {right}")
    if args.mixture == "sft" and args.assistant_only is False:
        p.error("--no-assistant-only: chat SFT trains on what the assistant writes only")
    return args


def parse_sources(entries: list[str]) -> dict[str, dict]:
    """--source TASK=PATH flags -> {task: {"source": path}}, to splat into the task's call ({} keeps the Hub)."""
    sources = defaultdict(dict)
    for entry in entries:
        task, sep, path = entry.partition("=")
        if not sep or task not in SOURCES or not path:
            raise ValueError(f"--source {entry!r}: expected TASK=PATH with TASK in {', '.join(SOURCES)}")
        sources[task] = {"source": path}
    return sources


def extra_parts(args, identity_copies: int, spelling_sizes: tuple[int, int]) -> list[tuple[str, int, object]]:
    """(name, size, load) of the user's files, identity conversations and the spelling tasks, as the flags ask, for
    `load_parts`. Files are read (and checked strictly) now: their length sets their share of the mixture."""
    if args.identity_name is not None and (args.identity_file or not args.identity):
        raise ValueError(
            "--identity-name names the generated identity conversations: it needs --identity and no --identity-file"
        )
    parts = []
    for path in args.data or []:
        rows = tasks.jsonl_conversations(path)
        parts.append((path, len(rows), functools.partial(head, rows)))
    if args.identity_file:
        rows = tasks.identity(path=args.identity_file)
        parts += [("identity", len(rows), functools.partial(head, rows))] * identity_copies
    elif args.identity:
        name = "nanochat" if args.identity_name is None else args.identity_name
        # nanochat's file holds ~1,000 conversations
        parts += [("identity", 1000, lambda stop: tasks.identity(name, size=stop or 1000))] * identity_copies
    if args.spelling:
        simple, bee = spelling_sizes
        parts += [
            ("SimpleSpelling", simple, lambda stop: tasks.simple_spelling(stop or simple)),
            ("SpellingBee", bee, lambda stop: tasks.spelling_bee(stop or bee)),
        ]
    return parts


def load_data(args, tokenizer):
    """The mixture, as a Dataset of `messages`, shuffled with seed 42 (SFT: each fits `--max-seq-len`)."""
    sources = parse_sources(args.source)
    parts = recipe(args.mixture, sources, args.num_proc) if args.recipe and not args.data else []
    parts += extra_parts(args, args.identity_copies, args.spelling_sizes)
    parts = load_parts(parts, args.max_rows)
    if args.mixture == "sft":
        # a public conversation too long for a row is skipped and counted; one in your own file is an error
        parts = [
            (name, tasks.drop_long(part, tokenizer, args.max_seq_len, name, strict=name in (args.data or []),
                                   num_proc=args.num_proc))
            for name, part in parts
        ]  # fmt: skip
    data = tasks.mixture([part for _, part in parts], limit=args.max_rows)
    if os.environ.get("RANK", "0") == "0":
        shares = ", ".join(f"{name} {len(part):,}" for name, part in parts)
        cap = (
            f", cut to --max-rows {args.max_rows:,}"
            if args.max_rows and args.max_rows < sum(map(len, (p for _, p in parts)))
            else ""
        )
        print(f"mixture: {shares}{cap}")
    return data


def optimizer_options(args, lr_scale: float) -> tuple[dict, dict]:
    """(SFTTrainer kwargs, SFTConfig kwargs) for the chosen optimizer."""
    optimizer = args.optimizer or ("adamw" if args.lora else "muon")
    if args.lora and optimizer == "muon":
        raise ValueError("--lora trains adapters with AdamW; Muon would orthogonalise each low-rank factor on its own")
    muon_rates = {
        k: getattr(args, k) for k in ("matrix_lr", "embedding_lr", "unembedding_lr") if getattr(args, k) is not None
    }
    if optimizer == "muon" and args.lr is not None:
        raise ValueError(
            "--lr is the --optimizer adamw rate; Muon takes --matrix-lr, --embedding-lr and --unembedding-lr"
        )
    if optimizer == "adamw" and muon_rates:
        flags = ", ".join("--" + k.replace("_", "-") for k in muon_rates)
        raise ValueError(
            f"{flags}: Muon rates, unused by AdamW ({'--lora' if args.lora else '--optimizer adamw'}); "
            "set its one rate with --lr"
        )
    if not args.lora and (args.lora_rank is not None or args.lora_alpha is not None):
        raise ValueError("--lora-rank and --lora-alpha shape LoRA adapters: they need --lora")
    trainer_kwargs = {}
    if args.lora:
        rank = 16 if args.lora_rank is None else args.lora_rank
        alpha = 32 if args.lora_alpha is None else args.lora_alpha
        trainer_kwargs["peft_config"] = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
        )
    if optimizer == "muon":
        # rates not given keep build_optimizer's defaults, nanochat's
        trainer_kwargs["optimizer_cls_and_kwargs"] = (MuonAdamWFactory, dict(**muon_rates, lr_scale=lr_scale))
        return trainer_kwargs, {}
    # LoRA adapters start at zero and are small: they take ~10x the full fine-tuning rate (PEFT's usual advice)
    lr = args.lr if args.lr is not None else args.adamw_lr * (10 if args.lora else 1)
    # nanochat's AdamW settings (betas 0.8/0.95, eps 1e-10, no decay) at one rate for every trainable weight
    return trainer_kwargs, dict(learning_rate=lr, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-10, weight_decay=0.0)


def compile_by_default(args) -> bool:
    """Mid-training on a GPU runs the decoder stack compiled, as pretraining does (`compile_backbone`; TRL's fused head
    stays eager beside it): its packed rows all have one shape, so it compiles once (about a minute) and then skips
    the memory round trips of the eager norms, rotary embeddings and activations. Eager otherwise: SFT's rows are
    padded to each batch's longest conversation, so dynamo compiles for the first length, then again for any length
    (on one H100 at depth 8: 103 s and 45 s, three times what the other 498 steps took; whether the dynamic graph
    repays that over a long SFT run is not measured); and under FSDP, as in pretraining (a compiled FSDP2 model met
    sharded weights there)."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")  # set by `accelerate launch`
    return torch.cuda.is_available() and args.mixture == "mid" and not fsdp


def run_options(args, out: Path) -> dict:
    """SFTConfig fields both stages set the same way."""
    # Collation in worker processes: on the main process it took 18 ms a step (d12 mid-training on an H100), right
    # after the host had waited for the GPU to log the step's loss and TRL's metrics, so the GPU sat idle meanwhile.
    workers = args.dataloader_workers if args.dataloader_workers is not None else 2 * torch.cuda.is_available()
    return dict(
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        output_dir=str(out / "checkpoints"),
        num_train_epochs=1,  # nanochat: one pass over the mixture
        max_length=args.max_seq_len,
        max_grad_norm=0.0,  # nanochat clips only in pretraining
        # TRL turns recomputation on by default; nanochat never recomputes (transformers renamed the field in 5.x)
        **{RECOMPUTE_FIELD: args.gradient_checkpointing},
        bf16=torch.cuda.is_available(),  # autocast over fp32 weights, as pretraining
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator (else a warning per run)
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN must show (and stop the run), not be replaced by the running mean
        save_strategy="steps" if args.save_every > 0 else "no",
        save_steps=max(args.save_every, 1),
        save_total_limit=args.keep_checkpoints,
        report_to=args.report_to,
        seed=args.seed,
        dataset_num_proc=args.num_proc,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; searching for unused ones costs time
    )


def build(args):
    """Model, data and trainer, ready to `train()` (tests take batches from it)."""
    out = Path(args.out)
    model, tokenizer = load_model(args.model)
    context = model.config.max_position_embeddings
    args.max_seq_len = args.max_seq_len or context
    if args.max_seq_len > context:
        raise ValueError(f"--max-seq-len {args.max_seq_len} is longer than the model's context ({context})")
    world = world_size()
    if args.mixture == "mid":
        tokens_per_micro = args.device_batch_size * args.max_seq_len * world
        if args.total_batch_size % tokens_per_micro:
            raise ValueError(
                f"--total-batch-size {args.total_batch_size} is not divisible by device batch "
                f"{args.device_batch_size} x seq {args.max_seq_len} x {world} processes"
            )
        grad_accum = args.total_batch_size // tokens_per_micro
    else:
        per_micro = args.device_batch_size * world
        if args.examples_per_step % per_micro:
            raise ValueError(
                f"--examples-per-step {args.examples_per_step} is not divisible by device batch "
                f"{args.device_batch_size} x {world} processes"
            )
        grad_accum = args.examples_per_step // per_micro
    explicit_scale = args.lr_scale != MIXTURES[args.mixture]["lr_scale"]
    if explicit_scale and (args.lora or args.optimizer == "adamw"):
        raise ValueError("--lr-scale scales the Muon + AdamW rates; AdamW alone (--optimizer adamw, --lora) takes --lr")
    trainer_kwargs, optimizer_config = optimizer_options(args, lr_scale=args.lr_scale)
    packed = args.mixture == "mid"
    config = SFTConfig(
        **run_options(args, out),
        **optimizer_config,
        per_device_train_batch_size=args.device_batch_size,
        gradient_accumulation_steps=grad_accum,
        # mid: one stream cut into rows, like nanochat's mid-training loader; sft: one conversation per row
        packing=packed,
        **({"packing_strategy": "wrapped", "completion_only_loss": False} if packed else {}),
        assistant_only_loss=args.assistant_only,
    )
    with config.main_process_first(desc="conversations"):  # rank 0 fills the datasets cache, the others read it
        data = load_data(args, tokenizer)
    metrics = MetricsCallback(out / "metrics.jsonl")
    trainer = NanochatSFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[metrics],
        warmdown_ratio=args.warmdown_ratio,
        momentum_warmup_steps=args.momentum_warmup_steps,
        **trainer_kwargs,
    )
    if compile_by_default(args) if args.compile is None else args.compile:
        compile_backbone(trainer.model)
    return trainer, data, metrics


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    args.model = model_folder("--model", args.model)
    replace = check_output(out, resume=args.resume is not None, overwrite=args.overwrite, what=f"{args.mixture} run")
    resume = resume_checkpoint(args.resume, out)
    trainer, data, metrics = build(args)
    if replace and trainer.accelerator.is_main_process:  # --overwrite, checked up front, done once the run is built
        clear_output(out)
    trainer.accelerator.wait_for_everyone()
    accelerator = trainer.accelerator
    if args.mixture == "mid":
        shape = (
            f"{len(trainer.train_dataset):,} rows of {args.max_seq_len} tokens, {args.total_batch_size:,} tokens per "
            f"step ({'assistant tokens' if args.assistant_only else 'all tokens'} trained)"
        )
    else:
        shape = f"{args.examples_per_step} per step"
    accelerator.print(
        f"{'mid-training' if args.mixture == 'mid' else 'SFT'} on {len(data):,} conversations, {shape} | "
        f"{accelerator.num_processes} process(es), gradient accumulation {trainer.args.gradient_accumulation_steps}"
    )
    train_and_save(trainer, metrics, resume, out)


if __name__ == "__main__":
    main_entry(main)
