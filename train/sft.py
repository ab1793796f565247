"""Supervised fine-tuning: nanochat's `chat_sft.py` on TRL's `SFTTrainer`.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train/sft.py --model out/mid/final --out out/sft
    python train/sft.py --preset tiny --model out/mid/final --out out/sft   # CPU, offline, minutes

Notable:
- The seed's mixture: ARC-Easy 2.3K + ARC-Challenge 1.1K + GSM8K 8K + the first 10K SmolTalk conversations = 21.4K,
  shuffled together, one epoch (~670 steps); `--identity` adds 1K identity conversations and `--spelling`
  SimpleSpelling 300 + SpellingBee 300 (nanochat's later mixture). `--data` trains on your own JSONL instead.
  `--max-rows N` stops every part at its share of N: a quick run keeps the mixture's proportions.
- One conversation per row, right-padded with `<|assistant_end|>` (never trained), no packing: the model sees each
  conversation alone, as at inference.
- Loss only on what the assistant writes: its text, its python calls and `<|assistant_end|>`; user turns, tool outputs
  (the calculator writes those) and padding are masked. TRL takes the mask from the `{% generation %}` blocks of our
  chat template, which equal `render_conversation`'s mask token for token (tests/test_sft.py checks the batches).
- Conversations longer than the context are dropped (counted in the log; an error in your own `--data`), where
  nanochat crops them and can cut the answer off.
- 32 conversations per step whatever the GPU count (4 per GPU per micro-step, gradient accumulation from the world
  size). Muon + AdamW at 0.02 x the base rates, decaying linearly to 0 over the epoch; Muon momentum fixed at 0.95.
- Checkpoints every `--save-every` steps, `--resume`; logs: progress bar, `OUT/metrics.jsonl`; output `OUT/final`.
- Differences from the seed: the loss of a step is normalised by its total count of trained tokens (nanochat averages
  per micro-batch), and TRL's sampler order differs from nanochat's.
"""

import argparse
from pathlib import Path

from trl import SFTConfig

from hfnanochat import tasks
from hfnanochat.training.sft import (
    MetricsCallback,
    NanochatSFTTrainer,
    add_common_arguments,
    extra_parts,
    load_model,
    load_parts,
    optimizer_options,
    parse_sources,
    resume_checkpoint,
    run_options,
    train_and_save,
    world_size,
)

PRESETS = {
    # offline and CPU-sized: the generated tasks only, 64 conversations of at most 256 tokens, 8 per step
    "tiny": dict(
        recipe=False,
        identity=True,
        spelling=True,
        max_rows=64,
        max_seq_len=256,
        device_batch_size=4,
        examples_per_step=8,
        save_every=0,
        num_proc=1,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for a tier; explicit flags win")
    add_common_arguments(p, adamw_lr=2e-5)  # TRL's default fine-tuning rate
    p.add_argument("--device-batch-size", type=int, default=4, help="conversations per GPU per micro-step")
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step")
    p.add_argument(
        "--lr-scale",
        type=float,
        default=None,
        help="--optimizer muon: every rate is this x the base model's (default 0.02, the seed's)",
    )
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def load_data(args, tokenizer):
    """The mixture, as a Dataset of `messages` that each fit `--max-seq-len`, shuffled with seed 42."""
    sources = parse_sources(args.source)
    num_proc = args.num_proc
    parts = []
    if args.recipe and not args.data:
        parts = [  # (name, conversations in the full recipe, load(stop))
            (
                "ARC-Easy",
                2_300,
                lambda stop: tasks.arc("ARC-Easy", "train", stop=stop, num_proc=num_proc, **sources["arc"]),
            ),
            (
                "ARC-Challenge",
                1_100,
                lambda stop: tasks.arc("ARC-Challenge", "train", stop=stop, num_proc=num_proc, **sources["arc"]),
            ),
            # math problems with calculator calls
            (
                "GSM8K",
                8_000,
                lambda stop: tasks.gsm8k("main", "train", stop=stop, num_proc=num_proc, **sources["gsm8k"]),
            ),
            # the first 10K of SmolTalk's 460K general conversations
            (
                "SmolTalk",
                10_000,
                lambda stop: tasks.smoltalk("train", stop=stop or 10_000, num_proc=num_proc, **sources["smoltalk"]),
            ),
        ]
    parts += extra_parts(args, identity_copies=1, spelling_sizes=(300, 300))
    # a public conversation too long for a row is skipped and counted; one in your own file is an error
    parts = [
        tasks.drop_long(part, tokenizer, args.max_seq_len, name, strict=name in (args.data or []), num_proc=num_proc)
        for name, part in load_parts(parts, args.max_rows)
    ]
    return tasks.mixture(parts, limit=args.max_rows)


def build(args):
    """Model, data and trainer, ready to `train()` (tests take batches from it)."""
    out = Path(args.out)
    model, tokenizer = load_model(args.model)
    context = model.config.max_position_embeddings
    args.max_seq_len = args.max_seq_len or context
    if args.max_seq_len > context:
        raise ValueError(f"--max-seq-len {args.max_seq_len} is longer than the model's context ({context})")
    world = world_size()
    per_micro = args.device_batch_size * world
    if args.examples_per_step % per_micro:
        raise ValueError(
            f"--examples-per-step {args.examples_per_step} is not divisible by device batch "
            f"{args.device_batch_size} x {world} processes"
        )
    if args.lr_scale is not None and (args.lora or args.optimizer == "adamw"):
        raise ValueError("--lr-scale scales the Muon + AdamW rates; AdamW alone (--optimizer adamw, --lora) takes --lr")
    lr_scale = 0.02 if args.lr_scale is None else args.lr_scale
    trainer_kwargs, optimizer_config = optimizer_options(args, lr_scale=lr_scale)
    config = SFTConfig(
        **run_options(args, out),
        **optimizer_config,
        per_device_train_batch_size=args.device_batch_size,
        gradient_accumulation_steps=args.examples_per_step // per_micro,
        packing=False,  # one conversation per row, right-padded
        assistant_only_loss=True,
    )
    with config.main_process_first(desc="conversations"):  # rank 0 fills the datasets cache, the others read it
        data = load_data(args, tokenizer)
    metrics = MetricsCallback(out / "metrics.jsonl")
    # warm-down over every step = nanochat's `1 - step / num_iterations`; momentum warm-up 0 = fixed 0.95
    trainer = NanochatSFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[metrics],
        warmdown_ratio=1.0,
        momentum_warmup_steps=0,
        **trainer_kwargs,
    )
    return trainer, data, metrics


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    resume = resume_checkpoint(args, out)
    trainer, data, metrics = build(args)
    accelerator = trainer.accelerator
    accelerator.print(
        f"SFT on {len(data):,} conversations, {args.examples_per_step} per step | "
        f"{accelerator.num_processes} process(es), gradient accumulation "
        f"{trainer.args.gradient_accumulation_steps}"
    )
    train_and_save(trainer, metrics, resume, out)


if __name__ == "__main__":
    main()
