"""What `train/midtrain.py` and `train/sft.py` share: nanochat's schedules inside TRL's `SFTTrainer`, the optimizer
options, the data options, `metrics.jsonl` and the final folder.

Notable:
- `NanochatSFTTrainer` is `SFTTrainer` with one documented hook overridden, `create_scheduler`: TRL builds the
  scheduler inside `train()`, once it knows the step count (after packing), and never calls our `apply_schedule`. Ours
  is a `LambdaLR` over each group's `initial_lr` (so Muon and every AdamW group keep their own rates) with nanochat's
  `lr_multiplier`, and its `step()` also sets the Muon momentum. It is saved and restored with the checkpoint like any
  scheduler, and `learning_rate` in the logs is the real one. `_load_optimizer_and_scheduler` is overridden too: a
  resume keeps this run's rates (the checkpoint's state carries the old ones), so "resume with a lower learning rate"
  after a divergence really trains at the lower rates.
- Optimizers: Muon + AdamW at nanochat's rates (`MuonAdamWFactory` through `optimizer_cls_and_kwargs`, built after
  the model is wrapped), or transformers' AdamW at one rate (`--optimizer adamw`), or LoRA adapters (PEFT) trained
  with AdamW. No gradient clipping: nanochat clips only in pretraining. A rate flag the chosen optimizer would
  ignore (`--lr` with Muon, `--matrix-lr` with AdamW, `--lora-rank` without `--lora`) is a ValueError.
- `--max-rows` stops every part of the mixture at its share, so a quick run keeps the recipe's proportions.
- A non-finite loss stops the run without saving that step's checkpoint: `--resume` picks the last good one.
- The final folder is what the next stage loads: weights (LoRA merged in; the adapter is kept next to it), tokenizer
  with the chat template, `token_bytes.pt`, `generation_config.json` that stops on `<|assistant_end|>`.
"""

import argparse
import functools
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTTrainer

from .. import tasks
from ..tokenizer import get_special_token_ids
from .export import save_final
from .metrics import append_jsonl, peak_flops, truncate_metrics
from .optim import MuonAdamWFactory, lr_multiplier, muon_momentum

# every matrix of the decoder layers; TRL rejects an adapter on lm_head (its fused head reads lm_head.weight directly)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
SOURCES = ("smoltalk", "mmlu", "gsm8k", "arc")


class NanochatSchedule(LambdaLR):
    """lr = initial_lr * lr_multiplier(step) on every group; Muon groups also get muon_momentum(step)."""

    def __init__(self, optimizer, num_steps: int, warmdown_ratio: float, momentum_warmup_steps: int):
        self.momentum_warmup_steps = momentum_warmup_steps  # LambdaLR's constructor already calls step()
        super().__init__(
            optimizer, functools.partial(lr_multiplier, num_iterations=num_steps, warmdown_ratio=warmdown_ratio)
        )

    def step(self, epoch=None):
        super().step(epoch)
        self.set_momentum()

    def set_momentum(self):
        momentum = muon_momentum(self.last_epoch, self.momentum_warmup_steps)
        for group in self.optimizer.param_groups:
            if group.get("kind") == "muon":
                group["momentum"] = momentum


class NanochatSFTTrainer(SFTTrainer):
    """SFTTrainer whose scheduler is `NanochatSchedule` (warm-down over the last `warmdown_ratio` of the steps;
    1.0 is a linear decay from the first step)."""

    def __init__(self, *args, warmdown_ratio: float, momentum_warmup_steps: int = 0, **kwargs):
        self.warmdown_ratio, self.momentum_warmup_steps = warmdown_ratio, momentum_warmup_steps
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = NanochatSchedule(
                optimizer or self.optimizer, num_training_steps, self.warmdown_ratio, self.momentum_warmup_steps
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resume with this run's rates: the checkpoint's optimizer groups and scheduler `base_lrs` hold the old run's,
        and loading them would silently undo a lower `--matrix-lr` / `--lr` given to get past a divergence. Moments,
        step count and data position still come from the checkpoint."""
        fresh = [
            {k: g[k] for k in ("initial_lr", "initial_weight_decay") if k in g} for g in self.optimizer.param_groups
        ]
        super()._load_optimizer_and_scheduler(checkpoint)
        schedule, step = self.lr_scheduler, self.lr_scheduler.last_epoch
        for group, rates, multiplier in zip(self.optimizer.param_groups, fresh, schedule.lr_lambdas, strict=True):
            group.update(rates)
            group["lr"] = group["initial_lr"] * multiplier(step)
        schedule.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what the next log reports
        schedule.set_momentum()  # from this run's --momentum-warmup-steps


class MetricsCallback(TrainerCallback):
    """OUT/metrics.jsonl like pretraining: one JSON object per step (step, loss, lrm, lr, tokens/s, ...). `lr` is
    group 0's rate (Trainer's `learning_rate`): the lm_head AdamW group under Muon, the one rate under AdamW. `lrm` is
    the schedule's multiplier, read from the first group with a non-zero rate (`--unembedding-lr 0` makes group 0's
    zero). A non-finite loss stops the run (`failed` says why) and cancels that step's checkpoint, so that `--resume`
    picks the last good one."""

    def __init__(self, path: Path):
        self.path, self.failed, self.lrm = Path(path), None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                truncate_metrics(self.path, state.global_step)
        self.t0, self.tokens0 = time.time(), None
        # MFU as pretraining reports it: nanochat's FLOPs per token at the row length, over the peak of every GPU.
        # TRL's num_tokens counts real (non-padding) tokens, so padding shows up as lower MFU, as it should.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps ours
        peak = peak_flops(args.device)
        self.flops_per_token = None
        if hasattr(base, "estimate_flops") and peak:
            self.flops_per_token = base.estimate_flops(args.max_length or base.config.max_position_embeddings)
            self.peak = peak * args.world_size

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # the rates this step used: by the time of the log the scheduler has moved on to the next step's
        self.lrm = next((g["lr"] / g["initial_lr"] for g in optimizer.param_groups if g["initial_lr"]), None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # the end-of-training summary has train_loss instead
            return
        now = time.time()
        dt = now - self.t0
        tokens = logs.get("num_tokens")
        record = dict(
            step=state.global_step,
            loss=logs["loss"],
            lrm=self.lrm,
            lr=logs["learning_rate"],
            mean_token_accuracy=logs.get("mean_token_accuracy"),
            num_tokens=tokens,
            dt=dt,
            tok_per_sec=(tokens - self.tokens0) / dt if None not in (tokens, self.tokens0) else None,
            epoch=logs.get("epoch"),
        )
        if self.flops_per_token and record["tok_per_sec"]:
            record["mfu"] = 100 * self.flops_per_token * record["tok_per_sec"] / self.peak
        self.t0, self.tokens0 = now, tokens
        if state.is_world_process_zero:
            append_jsonl(self.path, record)
        if not math.isfinite(logs["loss"]):
            self.failed = f"step {state.global_step}: loss is {logs['loss']}"
            control.should_training_stop = True
            control.should_save = False  # set by the default flow on a save step, before this log


def add_common_arguments(p: argparse.ArgumentParser, adamw_lr: float) -> None:
    """Model, data, optimizer and run flags both stages take."""
    p.add_argument("--model", required=True, help="HF folder of the previous stage (loaded with trust_remote_code)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, final/ (the HF folder)")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
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
        help="the stage's public datasets (--no-recipe: only --data / --identity / --spelling)",
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
        help="the name the generated identity conversations give the model (default nanochat)",
    )
    p.add_argument("--identity-file", default=None, help="JSONL of identity conversations instead of the generated")
    p.add_argument("--spelling", action="store_true", help="add nanochat's SimpleSpelling + SpellingBee tasks")
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="train on at most this many conversations, each part of the mixture cut to its share of them (quick runs)",
    )
    p.add_argument(
        "--num-proc",
        type=int,
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
    p.add_argument("--matrix-lr", type=float, default=None, help="--optimizer muon: Muon's rate (default 0.02)")
    p.add_argument(
        "--embedding-lr",
        type=float,
        default=None,
        help="--optimizer muon: AdamW rate of the embeddings, scaled by (d/768)^-0.5 (default 0.2)",
    )
    p.add_argument(
        "--unembedding-lr",
        type=float,
        default=None,
        help="--optimizer muon: AdamW rate of lm_head, scaled by (d/768)^-0.5 (default 0.004)",
    )
    p.add_argument("--lr", type=float, default=None, help=f"--optimizer adamw rate (default {adamw_lr:g}; LoRA 10x)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights")
    p.add_argument("--lora-rank", type=int, default=None, help="--lora: adapter rank (default 16)")
    p.add_argument("--lora-alpha", type=int, default=None, help="--lora: adapter scale alpha/rank (default 32)")
    # run
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(adamw_lr=adamw_lr)


def parse_sources(entries: list[str]) -> dict[str, dict]:
    """--source TASK=PATH flags -> {task: {"source": path}}, to splat into the task's call ({} keeps the Hub)."""
    sources = defaultdict(dict)
    for entry in entries:
        task, sep, path = entry.partition("=")
        if not sep or task not in SOURCES or not path:
            raise ValueError(f"--source {entry!r}: expected TASK=PATH with TASK in {', '.join(SOURCES)}")
        sources[task] = {"source": path}
    return sources


def world_size() -> int:
    """The number of processes, from WORLD_SIZE (accelerate launch and torchrun set it): the batch arithmetic comes
    before SFTConfig exists, and an accelerate state built earlier would be reset by SFTConfig (on CPU, wrongly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_model(path: str):
    """The previous stage's folder: model (fp32 weights; bf16 comes from autocast) and its nanochat tokenizer."""
    if not Path(path).is_dir():
        raise ValueError(f"--model {path}: not a folder (expected the final/ folder of pretraining or mid-training)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    get_special_token_ids(tokenizer)  # raises if this is not a nanochat tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    model.config.use_cache = False
    return model, tokenizer


def head(rows, stop: int | None):
    """The first `stop` rows (None: all)."""
    return rows if stop is None else rows.select(range(min(stop, len(rows))))


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


def load_parts(parts: list[tuple[str, int, object]], max_rows: int | None) -> list[tuple[str, object]]:
    """(name, Dataset) of each (name, size, load) part of a mixture; `size` is the part's rows in the full recipe and
    `load(stop)` builds its first `stop` (None: the recipe's amount). Under `--max-rows` each part stops at its share of
    max_rows, rounded up (the shuffled mixture is then cut to max_rows), so a quick run keeps the recipe's
    proportions; stopping the parts rather than only the mixture spares converting 460K SmolTalk rows to keep 100."""
    if not parts:
        raise ValueError("nothing to train on: --no-recipe needs --data, --identity or --spelling")
    if max_rows is None:
        return [(name, load(None)) for name, _, load in parts]
    if max_rows < 1:
        raise ValueError(f"--max-rows {max_rows}: must be at least 1")
    total = sum(size for _, size, _ in parts)
    return [(name, load(min(size, math.ceil(max_rows * size / total)))) for name, size, load in parts]


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


def run_options(args, out: Path) -> dict:
    """SFTConfig fields both stages set the same way."""
    return dict(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=1,  # nanochat: one pass over the mixture
        max_length=args.max_seq_len,
        max_grad_norm=0.0,  # nanochat clips only in pretraining
        gradient_checkpointing=args.gradient_checkpointing,  # TRL turns it on by default; nanochat never recomputes
        bf16=torch.cuda.is_available(),  # autocast over fp32 weights, as pretraining
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


def resume_checkpoint(args, out: Path) -> str | bool | None:
    """`trainer.train(resume_from_checkpoint=...)`: True finds the newest checkpoint-N under OUT/checkpoints."""
    if args.resume is None:
        return None
    if args.resume == "latest":
        if not list((out / "checkpoints").glob("checkpoint-*")):
            raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        return True
    if not (Path(args.resume) / "trainer_state.json").is_file():
        raise ValueError(f"--resume {args.resume}: not a checkpoint folder (no trainer_state.json)")
    return args.resume


def train_and_save(trainer: SFTTrainer, metrics: "MetricsCallback", resume, out: Path) -> None:
    """Train (resuming if asked), stop with exit code 1 on a non-finite loss, else write `out/final`."""
    trainer.train(resume_from_checkpoint=resume)
    accelerator = trainer.accelerator
    if metrics.failed:
        accelerator.print(
            f"{metrics.failed}; stopping. Resume from the last checkpoint in {out / 'checkpoints'} "
            "with lower rates (--matrix-lr, --embedding-lr, --unembedding-lr; --lr for AdamW): the "
            "resumed run trains at the rates it is given."
        )
        sys.exit(1)
    if accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        print(f"saved {save_final(model, trainer.processing_class, out / 'final')}")
    accelerator.wait_for_everyone()
