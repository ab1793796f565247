"""Chat training on TRL's `SFTTrainer` (`train/sft.py`, both mixtures): nanochat's schedules inside the trainer,
`metrics.jsonl`, the mixture's parts and the final folder.

Notable:
- `NanochatSFTTrainer` is `SFTTrainer` with one documented hook overridden, `create_scheduler`: TRL builds the
  scheduler inside `train()`, once it knows the step count (after packing), and never calls our `apply_schedule`. Ours
  is a `LambdaLR` over each group's `initial_lr` (so Muon and every AdamW group keep their own rates) with nanochat's
  `lr_multiplier`, and its `step()` also sets the Muon momentum. It is saved and restored with the checkpoint like any
  scheduler, and `learning_rate` in the logs is the real one. `_load_optimizer_and_scheduler` is overridden too: a
  resume keeps this run's rates (the checkpoint's state carries the old ones), so "resume with a lower learning rate"
  after a divergence really trains at the lower rates.
- `load_parts` stops every part of a mixture at its share of `max_rows`, so a quick run keeps the recipe's
  proportions.
- A non-finite loss stops the run without saving that step's checkpoint: `--resume` picks the last good one.
- The final folder is what the next stage loads: weights (LoRA merged in; the adapter is kept next to it), tokenizer
  with the chat template, `token_bytes.pt`, `generation_config.json` that stops on `<|assistant_end|>`.
"""

import functools
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTTrainer

from ..tokenizer import get_special_token_ids
from .export import check_model_folder, save_final
from .metrics import append_jsonl, peak_flops, peak_memory_gib, truncate_metrics
from .optim import lr_multiplier, muon_momentum

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
        if self.model.config.model_type == "hfnanochat":  # another model would get a keyword it does not know
            self.data_collator = RightPaddedRows(self.data_collator)

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


def compile_backbone(model) -> None:
    """torch.compile the model's decoder stack in place (`nn.Module.compile`: the same module, the same state-dict
    keys), leaving TRL's fused LM head eager. Compiled into the model's graph, as `SFTConfig(torch_compile=True)`
    does, that head (Triton log-prob kernels over 32,768-token vocabulary tiles) broke at nanochat's 65,536-token
    vocabulary and 32 rows of 2048 tokens: an illegal memory access at depth 20, a NaN first loss at depth 12, on an
    H100 and an H200. The backbone alone gives the eager loss there, and compiled faster and ran as fast at 8,192
    (d12 forward + backward on an H200: 90.9 ms against 93.0 ms with the head in the graph)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps ours
    getattr(base, base.base_model_prefix).compile()


class RightPaddedRows:
    """TRL's collator, plus `right_padded=True` in each batch whose attention mask only cuts padding off the ends of
    its rows (every row of SFTTrainer's padded and `wrapped` batches): our model then attends causally without a mask
    tensor, the fast SDPA kernel, for the same loss (see `HFNanoChatModel.forward`). The mask stays in the batch: TRL
    counts tokens with it. Checked on the host, before the batch reaches the GPU, so it costs no synchronisation."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        mask = batch.get("attention_mask")
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and "position_ids" not in batch
            and bool((mask[:, 1:] <= mask[:, :-1]).all())  # each row: ones, then zeros
        ):
            batch["right_padded"] = True
        return batch


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
            peak_mem_gib=peak_memory_gib(args.device),
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


def world_size() -> int:
    """The number of processes, from WORLD_SIZE (accelerate launch and torchrun set it): the batch arithmetic comes
    before SFTConfig exists, and an accelerate state built earlier would be reset by SFTConfig (on CPU, wrongly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_model(path: str):
    """The previous stage's folder: model (fp32 weights; bf16 comes from autocast) and its nanochat tokenizer."""
    if not Path(path).is_dir():
        raise ValueError(f"--model {path}: not a folder (expected the final/ folder of pretraining or mid-training)")
    check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    get_special_token_ids(tokenizer)  # raises if this is not a nanochat tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    model.config.use_cache = False
    return model, tokenizer


def head(rows, stop: int | None):
    """The first `stop` rows (None: all)."""
    return rows if stop is None else rows.select(range(min(stop, len(rows))))


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


def resume_checkpoint(resume: str | None, out: Path) -> str | bool | None:
    """`trainer.train(resume_from_checkpoint=...)` for `--resume` (None, "latest" or a folder): True finds the newest
    checkpoint-N under OUT/checkpoints."""
    if resume is None:
        return None
    if resume == "latest":
        if not list((out / "checkpoints").glob("checkpoint-*")):
            raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        return True
    if not (Path(resume) / "trainer_state.json").is_file():
        raise ValueError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return resume


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
