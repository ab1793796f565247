"""Mid-train the base model on conversations: nanochat's `mid_train.py` on TRL's `SFTTrainer`.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train/midtrain.py \
        --model out/pretrain/final --out out/mid
    python train/midtrain.py --preset tiny --model out/pretrain/final --out out/mid   # CPU, offline, minutes

Notable:
- The seed's mixture: SmolTalk 460K + MMLU auxiliary-train 100K + GSM8K 8K = 568K conversations, shuffled together,
  one epoch; `--identity` adds 2 x 1K identity conversations and `--spelling` SimpleSpelling 200K + SpellingBee 80K
  (nanochat's later mixture). `--data` trains on your own JSONL instead; `--source gsm8k=DIR` reads a local copy.
  `--max-rows N` stops every part at its share of N: a quick run keeps the mixture's proportions.
- Rendered with our chat template (GSM8K's calculator calls become `<|python_start|>...<|output_end|>` blocks) and
  concatenated into one token stream cut into full `--max-seq-len` rows (TRL's "wrapped" packing): like the seed,
  attention runs across conversation boundaries and every token is trained, user turns included. `--assistant-only`
  trains only what the assistant writes (the SFT mask).
- The base model's optimizer: Muon + AdamW at the base rates, Muon momentum 0.85 -> 0.95 over 300 steps. The LR is
  flat, then decays linearly to 0 over the last 20% of the steps. (The seed's code computed `progress + (1 -
  progress) * final_lr_frac`, which *rises* to 1 over the epoch; its later versions use this warm-down, so do we.)
- 524,288 tokens per step whatever the GPU count: gradient accumulation comes from the world size, as pretraining.
- Checkpoints (model, optimizer, scheduler, RNG, data position) every `--save-every` steps; `--resume` continues.
  Logs: progress bar, `OUT/metrics.jsonl`, trackers via `--report-to`. Output: `OUT/final`, an HF folder.
- Differences from the seed: no validation bpb during training; each row loses the target of its first token (HF
  shifts inside a row; nanochat reads T+1 tokens); TRL packs 1,000 conversations at a time, so one row in every few
  hundred is short and padded; conversations longer than a row are not cropped to 2048 tokens first; the loss of a
  step is normalised by its total token count, where nanochat averages per micro-batch.
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
    # offline and CPU-sized: the generated tasks only, 128 conversations, 256-token rows, 8 rows per step
    "tiny": dict(
        recipe=False,
        identity=True,
        spelling=True,
        max_rows=128,
        max_seq_len=256,
        device_batch_size=4,
        total_batch_size=8 * 256,
        save_every=0,
        num_proc=1,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for a tier; explicit flags win")
    add_common_arguments(p, adamw_lr=1e-4)  # AdamW's usual rate for continued pretraining
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per GPU per micro-step")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step (2**19)")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="linear LR decay over the last fraction of steps")
    p.add_argument("--momentum-warmup-steps", type=int, default=300, help="Muon momentum 0.85 -> 0.95")
    p.add_argument("--assistant-only", action="store_true", help="loss on assistant tokens only (default: all tokens)")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def load_data(args):
    """The mixture, as a Dataset of `messages`, shuffled with seed 42."""
    sources = parse_sources(args.source)
    num_proc = args.num_proc
    parts = []
    if args.recipe and not args.data:
        parts = [  # (name, conversations in the full recipe, load(stop))
            (
                "SmolTalk",
                460_000,
                lambda stop: tasks.smoltalk("train", stop=stop, num_proc=num_proc, **sources["smoltalk"]),
            ),
            # multiple-choice questions from ARC, MC_TEST, OBQA, RACE
            (
                "MMLU",
                100_000,
                lambda stop: tasks.mmlu("auxiliary_train", "train", stop=stop, num_proc=num_proc, **sources["mmlu"]),
            ),
            # math problems that teach the calculator tool
            (
                "GSM8K",
                8_000,
                lambda stop: tasks.gsm8k("main", "train", stop=stop, num_proc=num_proc, **sources["gsm8k"]),
            ),
        ]
    parts += extra_parts(args, identity_copies=2, spelling_sizes=(200_000, 80_000))
    return tasks.mixture([part for _, part in load_parts(parts, args.max_rows)], limit=args.max_rows)


def build(args):
    """Model, data and trainer, ready to `train()` (tests take batches from it)."""
    out = Path(args.out)
    model, tokenizer = load_model(args.model)
    context = model.config.max_position_embeddings
    args.max_seq_len = args.max_seq_len or context
    if args.max_seq_len > context:
        raise ValueError(f"--max-seq-len {args.max_seq_len} is longer than the model's context ({context})")
    world = world_size()
    tokens_per_micro = args.device_batch_size * args.max_seq_len * world
    if args.total_batch_size % tokens_per_micro:
        raise ValueError(
            f"--total-batch-size {args.total_batch_size} is not divisible by device batch "
            f"{args.device_batch_size} x seq {args.max_seq_len} x {world} processes"
        )
    trainer_kwargs, optimizer_config = optimizer_options(args, lr_scale=1.0)  # the base model's rates
    config = SFTConfig(
        **run_options(args, out),
        **optimizer_config,
        per_device_train_batch_size=args.device_batch_size,
        gradient_accumulation_steps=args.total_batch_size // tokens_per_micro,
        packing=True,
        packing_strategy="wrapped",  # one stream cut into rows, like nanochat's mid-training loader
        assistant_only_loss=args.assistant_only,
        completion_only_loss=False,
    )
    with config.main_process_first(desc="conversations"):  # rank 0 fills the datasets cache, the others read it
        data = load_data(args)
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
    return trainer, data, metrics


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    resume = resume_checkpoint(args, out)
    trainer, data, metrics = build(args)
    accelerator = trainer.accelerator
    accelerator.print(
        f"mid-training on {len(data):,} conversations -> {len(trainer.train_dataset):,} rows of "
        f"{args.max_seq_len} tokens, {args.total_batch_size:,} tokens per step "
        f"({'assistant tokens' if args.assistant_only else 'all tokens'} trained) | "
        f"{accelerator.num_processes} process(es), gradient accumulation "
        f"{trainer.args.gradient_accumulation_steps}"
    )
    train_and_save(trainer, metrics, resume, out)


if __name__ == "__main__":
    main()
