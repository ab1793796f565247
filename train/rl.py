"""Reinforcement learning on GSM8K: nanochat's simplified GRPO (`chat_rl.py`) on TRL's `GRPOTrainer`.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train/rl.py --model out/sft/final --out out/rl
    python train/rl.py --model out/sft/final --out out/rl --data path/to/gsm8k/train.jsonl --steps 20   # offline

Notable:
- nanochat's algorithm is on-policy REINFORCE with a group-mean baseline. Each GRPOConfig field that makes TRL's
  GRPO exactly that is set below with the reason and the trl 1.16 source it was checked against. In short: no KL and
  no reference model, one update per batch of rollouts (PPO ratio 1, clipping inert), advantage = reward - mean of the
  prompt's 16 samples (no std), loss = -sum(logp * A) over the valid tokens of a micro-batch of 8 sequences / their
  count / accumulation steps (`bnpo`), no gradient clipping.
- Rollouts run on our engine through TRL's `rollout_func` (`hfnanochat.training.rl.EngineRollout`): the calculator
  runs inside them (`<|python_start|>expr<|python_end|>` -> forced `<|output_start|>result<|output_end|>`), and the
  forced tokens are masked out of the loss through `env_mask`. A failing call forces `error: <why>`.
- Completions that reach --max-new-tokens without stopping are kept and trained like the others (reward usually 0),
  as in nanochat (TRL's `mask_truncated_completions=False`). The stop token is not trained (nanochat drops it).
- 16 prompts x 16 samples per step whatever the GPU count; each micro-batch is 8 samples of one prompt, nanochat's
  pass (`NanochatGRPOTrainer` keeps TRL's generation batch in order), so 1 and N processes make the same update.
- Muon + AdamW at 0.05 x nanochat's base rates (the ones SFT scales by 0.02), or AdamW at --lr; linear decay to 0.
- pass@1..k on --eval-questions GSM8K test questions (k samples each) every --eval-every steps, as nanochat logs it.
- Logs: progress bar (reward, completion length, rollouts/s), `OUT/metrics.jsonl`; checkpoints every --save-every
  steps, `--resume`; final folder `OUT/final` (weights, tokenizer with the chat template).
"""

import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig

from hfnanochat import tasks
from hfnanochat.cli import (
    ArgumentParser,
    check_output,
    clear_output,
    main_entry,
    model_folder,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from hfnanochat.tasks.gsm8k import SOURCE as GSM8K_SOURCE
from hfnanochat.training.export import save_final
from hfnanochat.training.metrics import truncate_metrics
from hfnanochat.training.optim import build_optimizer
from hfnanochat.training.rl import EngineRollout, NanochatGRPOTrainer, PassAtK, RolloutLog, gsm8k_reward_func
from hfnanochat.training.sft import NanochatSchedule, load_model, resume_checkpoint, world_size

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in trl 1.16


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder of the SFT stage (its final/ folder)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, final/")
    p.add_argument("--data", default=GSM8K_SOURCE, help="GSM8K: a Hub id, or a local train.jsonl / folder")
    p.add_argument("--eval-data", default=None, help="GSM8K test split (default: the test split beside --data)")
    p.add_argument("--max-prompts", type=positive_int, default=None, help="train on the first N questions (quick runs)")
    p.add_argument("--steps", type=positive_int, default=None, help="stop after N steps (default: one epoch)")
    p.add_argument(
        "--prompts-per-step", type=positive_int, default=16, help="questions per optimizer step, all processes"
    )
    p.add_argument("--num-samples", type=positive_int, default=16, help="completions per question")
    p.add_argument("--device-batch-size", type=positive_int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=50)
    p.add_argument(
        "--prompts-per-call",
        type=positive_int,
        default=16,
        help="questions per engine call (one prefill, fan-out, one decode loop); rollouts equal across process "
        "counts when it divides every process's share",
    )
    # optimizer
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    p.add_argument(
        "--lr-scale",
        type=positive_float,
        default=None,
        help="muon: every rate is this x nanochat's base rate (default 0.05)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=None, help="adamw: its one rate (default 1e-6 = 0.05 x SFT's 2e-5)"
    )
    # evaluation, checkpoints, logs
    p.add_argument("--eval-every", type=non_negative_int, default=60, help="pass@k every N steps (0: never)")
    p.add_argument("--eval-questions", type=positive_int, default=400, help="GSM8K test questions for pass@k")
    p.add_argument("--eval-samples", type=positive_int, default=8, help="k of pass@k: samples per test question")
    p.add_argument("--save-every", type=non_negative_int, default=60, help="checkpoint every N steps (0: none)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2)
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (default: refuse to)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def eval_source(args) -> str:
    """The test split: --eval-data, else the folder or Hub id of --data (a train.jsonl's folder holds test.jsonl)."""
    if args.eval_data:
        return args.eval_data
    path = Path(os.path.expanduser(args.data))
    return str(path.parent) if path.is_file() else args.data


def build(args):
    """Model, data, optimizer and trainer, ready to `train()` (tests take them from here)."""
    for flag in ("prompts_per_step", "num_samples", "device_batch_size", "max_new_tokens", "prompts_per_call"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.num_samples < 2:
        raise ValueError("--num-samples must be at least 2: the advantage is the reward minus the group's mean")
    world = world_size()
    completions = args.prompts_per_step * args.num_samples
    if completions % (args.device_batch_size * world):
        raise ValueError(
            f"{args.prompts_per_step} prompts x {args.num_samples} samples = {completions} completions per step are "
            f"not divisible by --device-batch-size {args.device_batch_size} x {world} processes"
        )
    if args.optimizer == "muon" and args.lr is not None:
        raise ValueError("--lr is the --optimizer adamw rate; Muon + AdamW takes --lr-scale")
    if args.optimizer == "adamw" and args.lr_scale is not None:
        raise ValueError("--lr-scale scales the Muon + AdamW rates; --optimizer adamw takes --lr")
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} is not divisible by {world} processes")

    model, tokenizer = load_model(args.model)
    if not tokenizer.chat_template:
        raise ValueError(
            f"--model {args.model}: the tokenizer has no chat template; RL renders each question as a chat prompt "
            "(use the final/ folder of SFT, which saves tokenizer_config.json and chat_template.jinja)"
        )
    if args.max_new_tokens >= model.config.max_position_embeddings:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the question in the context")

    data, skipped = tasks.gsm8k_prompts("main", "train", source=args.data, stop=args.max_prompts)
    num_steps = len(data) // args.prompts_per_step  # nanochat: one epoch, the remainder dropped
    if args.steps is not None:
        num_steps = min(num_steps, args.steps)
    if num_steps < 1:
        raise ValueError(f"{len(data)} usable questions: fewer than --prompts-per-step {args.prompts_per_step}")
    questions = None
    if args.eval_every > 0:
        questions, _ = tasks.gsm8k_prompts("main", "test", source=eval_source(args), stop=args.eval_questions)

    if args.optimizer == "muon":
        # nanochat: setup_optimizers(unembedding 0.004, embedding 0.2, matrix 0.02) x init_lr_frac 0.05
        optimizer = build_optimizer(model, lr_scale=0.05 if args.lr_scale is None else args.lr_scale)
    else:  # nanochat's AdamW settings at one rate
        lr = 1e-6 if args.lr is None else args.lr
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    # nanochat's lrm = 1 - step / num_steps (warm-down over all steps); Muon momentum fixed at 0.95
    schedule = NanochatSchedule(optimizer, num_steps, warmdown_ratio=1.0, momentum_warmup_steps=0)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every field checked against trl 1.16.0 trainer/grpo_config.py (defaults, __post_init__) and
    # trainer/grpo_trainer.py (where it is read); line numbers in that release.
    config = GRPOConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=num_steps,
        # grpo_config.py:681, grpo_trainer.py:983: beta 0 creates no reference model and adds no KL term
        beta=0.0,
        # grpo_config.py:689, grpo_trainer.py:2642: one pass over each generation batch, so old logps are the current
        # ones detached (grpo_trainer.py:3066), the ratio is 1 and the clip (epsilon) never binds
        num_iterations=1,
        # grpo_config.py:789, grpo_trainer.py:2785: advantage = reward - group mean, no division by the std
        scale_rewards="none",
        # grpo_config.py:801, grpo_trainer.py:3158: sum(loss * mask) / sum(mask) per micro-batch, / accumulation
        loss_type="bnpo",
        # grpo_config.py:836, grpo_trainer.py:2488: truncated completions stay in the loss (nanochat keeps them)
        mask_truncated_completions=False,
        # grpo_config.py:480: completions per prompt; the generation batch must hold whole groups (__post_init__)
        num_generations=args.num_samples,
        # training_args: sequences per micro-batch, nanochat's device_batch_size; with steps_per_generation left None
        # it equals gradient_accumulation_steps (grpo_config.py:528, __post_init__): one generation per step
        per_device_train_batch_size=args.device_batch_size,
        gradient_accumulation_steps=completions // (args.device_batch_size * world),
        # grpo_config.py:494/532/543/536: the engine samples with these; TRL's log-probs divide by temperature
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=1.0,
        # grpo_config.py:507, grpo_trainer.py:1314: the task already shuffled with seed 42; nanochat walks it in order
        shuffle_dataset=False,
        max_grad_norm=0.0,  # nanochat clips only in pretraining
        gradient_checkpointing=args.gradient_checkpointing,  # GRPOConfig turns it on by default; nanochat never does
        bf16=torch.cuda.is_available(),  # autocast over fp32 weights, as the other stages
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="steps" if args.save_every > 0 else "no",
        save_steps=max(args.save_every, 1),
        save_total_limit=args.keep_checkpoints,
        report_to=args.report_to,
        seed=args.seed,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,  # our bar below shows reward, length and rollouts/s instead of the raw log dicts
    )
    rollout = EngineRollout(
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        prompts_per_call=args.prompts_per_call,
    )
    trainer = NanochatGRPOTrainer(
        model=model,
        reward_funcs=[gsm8k_reward_func(tokenizer)],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        optimizers=(optimizer, schedule),
        rollout_func=rollout,
    )
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback).__name__ == "PrinterCallback":  # disable_tqdm's replacement prints every log dict
            trainer.remove_callback(callback)
    log = RolloutLog(rollout, out / "metrics.jsonl", trainer.accelerator.num_processes)
    trainer.add_callback(log)
    trainer.add_callback(Progress(log))
    evaluator = None
    if questions is not None:
        evaluator = PassAtK(
            rollout, questions, args.eval_samples, args.eval_every, out / "metrics.jsonl", trainer.accelerator
        )
        trainer.add_callback(evaluator)
    return trainer, data, skipped, log, evaluator


class Progress(TrainerCallback):
    """A tqdm bar over the steps with the last step's reward, completion length and rollouts/s."""

    def __init__(self, log: RolloutLog):
        self.log, self.bar = log, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(
            total=state.max_steps, initial=state.global_step, disable=not state.is_world_process_zero, desc="rl"
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        r = self.log.last
        if self.bar is not None and r and logs and "loss" in logs:
            self.bar.n = state.global_step
            self.bar.set_postfix(
                reward=f"{r['reward']:.3f}",
                length=f"{r['completion_length']:.0f}",
                rollouts_s=f"{r['rollouts_per_sec']:.1f}",
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    args.model = model_folder("--model", args.model)
    replace = check_output(out, resume=args.resume is not None, overwrite=args.overwrite, what="RL run")
    resume = resume_checkpoint(args.resume, out)
    trainer, data, skipped, log, _ = build(args)
    accelerator = trainer.accelerator
    accelerator.print(
        f"RL on {len(data):,} GSM8K questions ({skipped:,} rows without an answer skipped), "
        f"{trainer.args.max_steps} steps of {args.prompts_per_step} x {args.num_samples} | "
        f"{accelerator.num_processes} process(es), gradient accumulation {trainer.args.gradient_accumulation_steps}"
    )
    if accelerator.is_main_process:
        if replace:  # --overwrite: checked up front, done once the run is built
            clear_output(out)
        elif resume is not None and (out / "metrics.jsonl").exists():  # the steps after the checkpoint are redone
            truncate_metrics(out / "metrics.jsonl", trainer_state_step(resume, out))
    accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume)
    if log.last and not all(v is None or v == v for v in log.last.values()):
        accelerator.print("a non-finite loss stopped the run; resume from the last checkpoint with a lower --lr-scale")
        sys.exit(1)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        print(f"saved {save_final(model, trainer.processing_class, out / 'final')}")
    accelerator.wait_for_everyone()


def trainer_state_step(resume, out: Path) -> int:
    """The step of the checkpoint `--resume` continues from (metrics after it are rewritten)."""
    folder = get_last_checkpoint(str(out / "checkpoints")) if resume is True else resume
    return int(Path(folder).name.split("-")[-1])


if __name__ == "__main__":
    main_entry(main)
