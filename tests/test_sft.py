"""train/midtrain.py and train/sft.py on a tiny model: the batches TRL builds, training, resume, LoRA, bad input.

The base model is a 2-layer, 64-wide HFNanoChat with a 512-token tokenizer trained on seeded syllable words, saved
as an HF folder and loaded back through `AutoModelForCausalLM(trust_remote_code=True)` like a real stage. Its
zero-initialised matrices (lm_head, output projections) are filled with small random values, a stand-in for
pretraining: with a zero lm_head no gradient would reach LoRA adapters. Conversations, and local copies of the public
datasets in their real layouts, are written by the tests; nothing needs the network or /work/shared.
"""

import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM
from hfnanochat.tokenizer import get_special_token_ids, render_conversation, save_tokenizer, train_tokenizer
from hfnanochat.training import sft as sft_utils
from hfnanochat.training.optim import build_optimizer, lr_multiplier, muon_momentum
from hfnanochat.training.sft import MetricsCallback, NanochatSchedule

ROOT = Path(__file__).resolve().parents[1]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dan", "tor", "el", "qu", "zi", "fa", "gu", "ber"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"train_{name}_script", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sft = _load_script("sft")


class midtrain:  # noqa: N801 -- train/sft.py --mixture mid, as train/midtrain.py runs it
    build, load_data = sft.build, sft.load_data

    @staticmethod
    def parse_args(argv):
        return sft.parse_args(["--mixture", "mid", *argv])

    @staticmethod
    def main(argv):
        return sft.main(["--mixture", "mid", *argv])


def words(rng, lo, hi):
    n = rng.randint(lo, hi)
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def make_conversations(n: int, seed: int = 0) -> list:
    """Every convention the trainers must render identically: plain turns, a system message, nanochat's parts with
    python calls, OpenAI-style tool calls with JSON-string arguments, multi-turn."""
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = i % 4
        if kind == 0:
            convs.append(
                {
                    "messages": [
                        {"role": "user", "content": words(rng, 3, 8)},
                        {"role": "assistant", "content": words(rng, 3, 10)},
                    ]
                }
            )
        elif kind == 1:
            convs.append(
                [
                    {"role": "system", "content": words(rng, 2, 4)},
                    {"role": "user", "content": words(rng, 2, 5)},
                    {"role": "assistant", "content": words(rng, 2, 5)},
                    {"role": "user", "content": words(rng, 2, 5)},
                    {"role": "assistant", "content": words(rng, 2, 5)},
                ]
            )
        elif kind == 2:
            convs.append(
                {
                    "messages": [
                        {"role": "user", "content": f"{words(rng, 2, 5)} {a} {b}?"},
                        {
                            "role": "assistant",
                            "content": [
                                {"type": "text", "text": words(rng, 1, 4) + " "},
                                {"type": "python", "text": f"{a}*{b}"},
                                {"type": "python_output", "text": str(a * b)},
                                {"type": "text", "text": f" {words(rng, 1, 3)}\n#### {a * b}"},
                            ],
                        },
                    ]
                }
            )
        else:
            convs.append(
                {
                    "messages": [
                        {"role": "user", "content": f"{words(rng, 2, 5)} {a} {b}"},
                        {
                            "role": "assistant",
                            "content": words(rng, 1, 3),
                            "tool_calls": [
                                {
                                    "type": "function",
                                    "function": {"name": "python", "arguments": json.dumps({"code": f"{a}+{b}"})},
                                }
                            ],
                        },
                        {"role": "tool", "content": str(a + b)},
                        {"role": "assistant", "content": f"#### {a + b}"},
                    ]
                }
            )
    return convs


def write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """{'base': model folder, 'data': conversations.jsonl, 'convs': the list, 'sources': --source flags, 'root'}"""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    tok = train_tokenizer(
        [words(rng, 5, 40) + rng.choice(".?!") + f" {i} {i * 7}" for i in range(3000)], vocab_size=512
    )
    config = HFNanoChatConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = HFNanoChatForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # nanochat zero-initialises lm_head and the output projections
                p.normal_(0.0, 0.05)
    model.save_pretrained(root / "base")
    save_tokenizer(tok, root / "base")
    convs = make_conversations(48)
    # local copies of the public datasets, in their Hub layouts
    src = root / "sources"
    chats = make_conversations(24, seed=1)  # SmolTalk has plain chats only: kinds 0 and 1, 12 of them
    write_jsonl(
        src / "smoltalk" / "train.jsonl",
        [{"messages": c if isinstance(c, list) else c["messages"]} for i, c in enumerate(chats) if i % 4 < 2],
    )
    write_jsonl(
        src / "mmlu" / "auxiliary_train" / "train.jsonl",
        [
            {
                "train": {
                    "question": words(rng, 3, 6),
                    "choices": [words(rng, 1, 2) for _ in range(4)],
                    "answer": i % 4,
                    "subject": "",
                }
            }
            for i in range(12)
        ],
    )
    write_jsonl(
        src / "gsm8k" / "train.jsonl",
        [
            {
                "question": f"{words(rng, 3, 6)} {i}?",
                "answer": f"{words(rng, 2, 4)} <<{i}*3={i * 3}>>{i * 3}.\n#### {i * 3}",
            }
            for i in range(12)
        ],
    )
    for subset in ("ARC-Easy", "ARC-Challenge"):
        datasets.Dataset.from_list(
            [
                {
                    "question": words(rng, 3, 6),
                    "answerKey": "C",
                    "choices": {"text": [words(rng, 1, 2) for _ in range(4)], "label": list("ABCD")},
                }
                for _ in range(6)
            ]
        ).to_parquet(str(src / "arc" / subset / "train-0.parquet"))
    sources = [f"--source={task}={src / task}" for task in ("smoltalk", "mmlu", "gsm8k", "arc")]
    return dict(
        root=root,
        base=str(root / "base"),
        tok=tok,
        convs=convs,
        sources=sources,
        data=write_jsonl(root / "conversations.jsonl", convs),
    )


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def rows_of(trainer) -> list[tuple[list, list]]:
    """(input_ids, labels) of every row the collator produces, padding stripped (and checked to be inert)."""
    pad = trainer.processing_class.pad_token_id
    rows = []
    for batch in trainer.get_train_dataloader():
        for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(attention.sum())
            assert attention[:n].all() and (ids[n:] == pad).all() and (labels[n:] == -100).all()
            rows.append((ids[:n].tolist(), labels[:n].tolist()))
    return rows


def masked(ids, mask):
    return [i if m else -100 for i, m in zip(ids, mask, strict=True)]


# -- what reaches the model --------------------------------------------------------------------------------------------


def test_sft_batches_equal_render_conversation(env, tmp_path):
    args = sft.parse_args(
        [
            "--model",
            env["base"],
            "--out",
            str(tmp_path),
            "--data",
            env["data"],
            "--max-seq-len",
            "128",
            "--device-batch-size",
            "5",
            "--examples-per-step",
            "5",
            "--num-proc",
            "1",
        ]
    )
    trainer, data, _ = sft.build(args)
    rows = rows_of(trainer)
    expected = []
    for conv in env["convs"]:  # the user's file as written, rendered by the nanochat reference
        ids, mask = render_conversation(env["tok"], conv)
        expected.append((ids, masked(ids, mask)))
    assert sorted(rows) == sorted(expected)
    special = get_special_token_ids(env["tok"])
    labels = [t for _, row in rows for t in row]
    assert special["python_start"] in labels and special["python_end"] in labels  # the call is trained...
    assert special["output_start"] not in labels and special["user_start"] not in labels  # ...its output is not
    assert labels.count(special["assistant_end"]) == sum(  # the model learns to stop, once per assistant turn
        sum(m["role"] == "assistant" and not m.get("tool_calls") for m in (c if isinstance(c, list) else c["messages"]))
        for c in env["convs"]
    )


@pytest.mark.parametrize("assistant_only", [False, True], ids=["all_tokens", "assistant_only"])
def test_midtrain_rows_are_the_rendered_stream(env, tmp_path, assistant_only):
    args = midtrain.parse_args(
        [
            "--model",
            env["base"],
            "--out",
            str(tmp_path),
            "--data",
            env["data"],
            "--max-seq-len",
            "64",
            "--device-batch-size",
            "4",
            "--total-batch-size",
            "256",
            "--num-proc",
            "1",
        ]
        + ["--assistant-only"] * assistant_only
    )
    trainer, data, _ = midtrain.build(args)
    rows = rows_of(trainer)
    stream_ids, stream_labels = [], []
    for messages in data["messages"]:  # TRL packs the mixture in its order into one stream
        ids, mask = render_conversation(env["tok"], messages)
        stream_ids += ids
        stream_labels += masked(ids, mask) if assistant_only else ids
    expected = [(stream_ids[i : i + 64], stream_labels[i : i + 64]) for i in range(0, len(stream_ids), 64)]
    assert sorted(rows) == sorted(expected)
    assert sum(len(ids) < 64 for ids, _ in rows) <= 1  # full rows, only the tail is short


@pytest.mark.parametrize("mixture", ["mid", "sft"])
def test_batches_tell_the_model_their_rows_are_right_padded(env, tmp_path, mixture):
    """Every batch of both stages is flagged `right_padded` (the model then attends without a mask tensor), and the
    flag leaves the trainer's loss on it unchanged."""
    batch = ["--total-batch-size", "256"] if mixture == "mid" else ["--examples-per-step", "4"]
    args = sft.parse_args(["--mixture", mixture, "--model", env["base"], "--out", str(tmp_path), "--data", env["data"],
                           "--max-seq-len", "64", "--device-batch-size", "4", *batch, "--num-proc", "1"])  # fmt: skip
    trainer, _, _ = sft.build(args)
    batches = list(trainer.get_train_dataloader())
    assert batches and all(b.get("right_padded") is True for b in batches)
    padded = next(b for b in batches if not b["attention_mask"].all()) if mixture == "sft" else batches[0]
    model = trainer.model.eval()
    with torch.no_grad():
        flagged = trainer.compute_loss(model, dict(padded))
        unflagged = trainer.compute_loss(model, {k: v for k, v in padded.items() if k != "right_padded"})
    torch.testing.assert_close(flagged, unflagged, atol=1e-5, rtol=1e-5)


def test_left_padded_or_position_id_batches_are_not_flagged():
    ones_then_zeros = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    flag = sft_utils.RightPaddedRows(lambda rows: {"attention_mask": torch.tensor(rows)})
    assert flag(ones_then_zeros.tolist()).get("right_padded") is True
    assert "right_padded" not in flag([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding: the mask is needed
    assert "right_padded" not in flag([[1, 0, 1, 1]])  # a hole
    packed = sft_utils.RightPaddedRows(
        lambda rows: {"attention_mask": torch.ones(1, 4), "position_ids": torch.zeros(1, 4)}
    )
    assert "right_padded" not in packed([None])  # padding-free packing: positions restart, documents stay apart


# -- training ----------------------------------------------------------------------------------------------------------


def test_schedule_sets_lr_and_muon_momentum(env):
    model = AutoModelForCausalLM.from_pretrained(env["base"], trust_remote_code=True)
    optimizer = build_optimizer(model)
    initial = [g["initial_lr"] for g in optimizer.param_groups]
    schedule = NanochatSchedule(optimizer, num_steps=10, warmdown_ratio=0.2, momentum_warmup_steps=4)
    for step in range(11):
        for group, lr in zip(optimizer.param_groups, initial):
            assert group["lr"] == pytest.approx(lr * lr_multiplier(step, 10, warmdown_ratio=0.2))
            if group["kind"] == "muon":
                assert group["momentum"] == pytest.approx(muon_momentum(step, 4))
        if step < 10:
            optimizer.step()
            schedule.step()
    assert [lr_multiplier(s, 10, warmdown_ratio=0.2) for s in (0, 8, 9, 10)] == [1.0, 1.0, 0.5, 0.0]
    sft_schedule = NanochatSchedule(build_optimizer(model), num_steps=4, warmdown_ratio=1.0, momentum_warmup_steps=0)
    lrms = []
    for _ in range(4):  # SFT: 1 - step / num_steps, momentum fixed at 0.95
        lrms.append(sft_schedule.get_last_lr()[0] / sft_schedule.base_lrs[0])
        assert {g["momentum"] for g in sft_schedule.optimizer.param_groups if g["kind"] == "muon"} == {0.95}
        sft_schedule.optimizer.step()
        sft_schedule.step()
    assert lrms == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_midtrain_recipe_then_sft_chain_through_hf_folders(env, tmp_path):
    out = tmp_path / "mid"
    midtrain.main(
        [
            "--model",
            env["base"],
            "--out",
            str(out),
            *env["sources"],
            "--identity",
            "--identity-name",
            "Zed",
            "--spelling",
            "--max-rows",
            "48",
            "--max-seq-len",
            "64",
            "--device-batch-size",
            "4",
            "--total-batch-size",
            "512",
            "--momentum-warmup-steps",
            "3",
            "--save-every",
            "0",
            "--num-proc",
            "1",
        ]
    )
    records = metrics(out)
    losses = [r["loss"] for r in records]
    assert len(records) >= 8 and [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    # flat, then a linear warm-down over the last 20% of the steps
    assert [r["lrm"] for r in records] == pytest.approx([lr_multiplier(s, len(records)) for s in range(len(records))])
    assert records[-1]["lrm"] < 1.0
    final = out / "final"
    for name in ("chat_template.jinja", "token_bytes.pt", "modeling_hfnanochat.py", "generation_config.json"):
        assert (final / name).is_file()
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(final)
    special = get_special_token_ids(tok)
    assert GenerationConfig.from_pretrained(final).eos_token_id == [special["assistant_end"], special["bos"]]
    assert model.config.use_cache
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "who are you"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out_ids = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] > prompt["input_ids"].shape[1]
    # the next stage starts from that folder, as the pipeline does
    sft.main(
        [
            "--model",
            str(final),
            "--out",
            str(tmp_path / "sft"),
            "--data",
            env["data"],
            "--max-seq-len",
            "128",
            "--device-batch-size",
            "8",
            "--examples-per-step",
            "8",
            "--num-proc",
            "1",
        ]
    )
    assert len(metrics(tmp_path / "sft")) == 6
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final", trust_remote_code=True).config.use_cache


@pytest.mark.slow  # two fresh interpreters over gloo plus a one-process run: ~10-20 s on 2 loaded cores
def test_two_processes_match_one(env, tmp_path):
    flags = [
        "--model",
        env["base"],
        "--data",
        env["data"],
        "--max-seq-len",
        "64",
        "--device-batch-size",
        "2",
        "--total-batch-size",
        "512",
        "--momentum-warmup-steps",
        "3",
        "--save-every",
        "0",
        "--num-proc",
        "1",
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torchrun, not `accelerate launch --cpu`, which starts a single process on a machine without GPUs
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(ROOT / "train" / "midtrain.py"),
            *flags,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), gradient accumulation 2" in result.stdout  # 512 tokens = 2 rows x 64 x 2 ranks x 2
    midtrain.main(flags + ["--out", str(tmp_path / "one")])
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # the same global batches (accelerate shards each batch of the seeded sampler), gradients summed in another
    # order, Muon's orthogonalisation split across the ranks and gathered: float rounding apart, the same run
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 3
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= 1e-5


def test_midtrain_resume_continues_exactly(env, tmp_path):
    flags = [
        "--model",
        env["base"],
        "--data",
        env["data"],
        "--max-seq-len",
        "64",
        "--device-batch-size",
        "4",
        "--total-batch-size",
        "256",
        "--momentum-warmup-steps",
        "4",
        "--warmdown-ratio",
        "0.5",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "9",
        "--num-proc",
        "1",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    midtrain.main(flags + ["--out", str(full)])
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-2", cut / "checkpoints" / "checkpoint-2")
    # the records of the interrupted run, marked; the ones after step 2 must be redone
    (cut / "metrics.jsonl").write_text("".join(json.dumps({**r, "before_resume": True}) + "\n" for r in metrics(full)))
    midtrain.main(flags + ["--out", str(cut), "--resume"])
    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert [r.get("before_resume", False) for r in b] == [True, True] + [False] * (len(a) - 2)  # it did resume
    assert a[-1]["lrm"] < 1.0  # the schedule (and the Muon momentum warm-up) continued from step 2
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["lrm"] for r in b] == [r["lrm"] for r in a]


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile (inductor) on CPU needs a C++ compiler")
@pytest.mark.parametrize("mixture", ["mid", "sft"])
def test_compiled_trainer_trains_like_the_eager_one(env, tmp_path, mixture):
    """--compile (mid-training's default on a GPU): the decoder stack runs through torch.compile, TRL's fused head
    eagerly beside it, and the losses are the eager run's. SFT's padded rows change shape from batch to batch: they
    recompile, they do not fail."""

    batch = ["--total-batch-size", "256"] if mixture == "mid" else ["--examples-per-step", "4"]
    flags = ["--mixture", mixture, "--model", env["base"], "--data", env["data"], "--max-seq-len", "64",
             "--device-batch-size", "4", *batch, "--save-every", "0", "--num-proc", "1",
             "--max-rows", "24"]  # fmt: skip
    losses = {}
    try:
        for compiled in (False, True):
            args = sft.parse_args(
                flags + ["--out", str(tmp_path / str(compiled)), f"--{'' if compiled else 'no-'}compile"]
            )
            trainer, _, metrics_callback = sft.build(args)
            trainer.train()
            backbone = trainer.model.model
            assert (backbone._compiled_call_impl is not None) == compiled
            assert not trainer.args.torch_compile  # the head stays out of the graph
            assert not any("_orig_mod" in key for key in trainer.model.state_dict())  # saved folders load as before
            losses[compiled] = [r["loss"] for r in metrics(args.out)]
    finally:
        torch._dynamo.reset()  # leave no compiled graphs behind for other tests
    assert len(losses[True]) >= 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_dataloader_workers_give_the_same_batches_and_losses(env, tmp_path):
    """--dataloader-workers (2 by default on a GPU): batches collated in worker processes train exactly like those
    collated on the main process."""
    flags = ["--mixture", "sft", "--model", env["base"], "--data", env["data"], "--max-seq-len", "64",
             "--device-batch-size", "4", "--examples-per-step", "4", "--save-every", "0", "--num-proc", "1",
             "--max-rows", "16"]  # fmt: skip
    losses = {}
    for workers in (0, 2):
        args = sft.parse_args(flags + ["--out", str(tmp_path / str(workers)), "--dataloader-workers", str(workers)])
        trainer, _, _ = sft.build(args)
        assert trainer.args.dataloader_num_workers == workers
        trainer.train()
        losses[workers] = [r["loss"] for r in metrics(args.out)]
    assert len(losses[2]) >= 3 and losses[2] == losses[0]


class RecordRates(TrainerCallback):
    """{step: {group name: lr}} as each optimizer step used them."""

    def __init__(self):
        self.rates = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step + 1] = {g["name"]: g["lr"] for g in optimizer.param_groups}


def train_midtrain(argv, *callbacks):
    """midtrain.main's training, with extra callbacks; returns the MetricsCallback."""
    args = midtrain.parse_args(argv)
    trainer, _, metrics_callback = midtrain.build(args)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=sft.resume_checkpoint(args.resume, Path(args.out)))
    return metrics_callback


def test_resume_trains_at_the_rates_it_is_given(env, tmp_path):
    flags = [
        "--model",
        env["base"],
        "--data",
        env["data"],
        "--max-seq-len",
        "64",
        "--device-batch-size",
        "4",
        "--total-batch-size",
        "256",
        "--warmdown-ratio",
        "0.5",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "9",
        "--num-proc",
        "1",
    ]
    full, low = tmp_path / "full", tmp_path / "low"
    straight = RecordRates()
    train_midtrain(flags + ["--out", str(full)], straight)
    (low / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-2", low / "checkpoints" / "checkpoint-2")
    resumed = RecordRates()  # 10x below the defaults (0.02, 0.004) for Muon and lm_head, embeddings unchanged
    train_midtrain(
        flags + ["--out", str(low), "--resume", "--matrix-lr", "0.002", "--unembedding-lr", "0.0004"], resumed
    )
    a, b = metrics(full)[2:], metrics(low)
    assert [r["step"] for r in b] == [r["step"] for r in a] == sorted(resumed.rates)  # it resumed at step 3
    assert [r["lrm"] for r in b] == pytest.approx([r["lrm"] for r in a]) and a[0]["lrm"] == 1.0  # same schedule...
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] / 10 for r in a])  # ...at a 10x lower lm_head rate
    muon = [name for name in straight.rates[3] if name.startswith("matrix_")]
    assert muon
    for step, rates in resumed.rates.items():
        expected = {
            name: lr / 10 if name == "lm_head" or name in muon else lr for name, lr in straight.rates[step].items()
        }
        assert rates == pytest.approx(expected)


def test_nan_on_a_save_step_saves_no_checkpoint(env, tmp_path):
    class Poison(TrainerCallback):  # a weight blows up after step 3: step 4, a save step, has a NaN loss
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    model.get_input_embeddings().weight.fill_(float("nan"))

    out = tmp_path / "nan"
    callback = train_midtrain(
        [
            "--model",
            env["base"],
            "--data",
            env["data"],
            "--max-seq-len",
            "64",
            "--device-batch-size",
            "4",
            "--total-batch-size",
            "256",
            "--save-every",
            "2",
            "--num-proc",
            "1",
            "--out",
            str(out),
        ],
        Poison(),
    )
    assert callback.failed == "step 4: loss is nan"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # it stopped there
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert get_last_checkpoint(str(out / "checkpoints")).endswith("checkpoint-2")  # what --resume latest takes


def test_sft_lora_trains_and_merges(env, tmp_path):
    out = tmp_path / "lora"
    sft.main(
        [
            "--model",
            env["base"],
            "--out",
            str(out),
            "--data",
            env["data"],
            "--lora",
            "--lr",
            "2e-2",
            "--max-seq-len",
            "128",
            "--device-batch-size",
            "4",
            "--examples-per-step",
            "8",
            "--num-proc",
            "1",
        ]
    )
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(env["base"], trust_remote_code=True)
    ids = torch.tensor([render_conversation(env["tok"], env["convs"][2])[0]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapter_logits = PeftModel.from_pretrained(base, str(out / "adapter"))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=True)
        merged_logits = merged(ids).logits
    assert not any("lora" in name for name in merged.state_dict())
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter did learn something


def test_sft_adamw_option_trains(env, tmp_path):
    out = tmp_path / "adamw"
    sft.main(
        [
            "--model",
            env["base"],
            "--out",
            str(out),
            "--data",
            env["data"],
            "--optimizer",
            "adamw",
            "--lr",
            "3e-3",
            "--max-seq-len",
            "128",
            "--device-batch-size",
            "8",
            "--examples-per-step",
            "8",
            "--num-proc",
            "1",
        ]
    )
    records = metrics(out)
    assert [r["lrm"] for r in records] == pytest.approx([1 - s / 6 for s in range(6)])  # linear decay to 0
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    before = AutoModelForCausalLM.from_pretrained(env["base"], trust_remote_code=True).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=True).state_dict()
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)


def test_max_rows_keeps_the_mixture_proportions(env, tmp_path):
    args = midtrain.parse_args(
        [
            "--model",
            env["base"],
            "--out",
            str(tmp_path),
            "--no-recipe",
            "--identity",
            "--spelling",
            "--num-proc",
            "1",
            "--max-rows",
            "280",
        ]
    )
    kinds = [
        ("bee" if m[1].get("tool_calls") else "spell" if m[0]["content"].startswith("Spell the word:") else "identity")
        for m in midtrain.load_data(args, env["tok"])["messages"]
    ]
    # identity 2 x 1K, SimpleSpelling 200K, SpellingBee 80K (cutting each part at 280 would give 1/2, 1/4, 1/4)
    assert len(kinds) == 280
    assert kinds.count("spell") == pytest.approx(280 * 200 / 282, abs=2)
    assert kinds.count("bee") == pytest.approx(280 * 80 / 282, abs=2)


def test_sft_recipe_from_local_sources(env, tmp_path):
    args = sft.parse_args(
        [
            "--model",
            env["base"],
            "--out",
            str(tmp_path),
            *env["sources"],
            "--identity",
            "--spelling",
            "--max-rows",
            "10",
            "--max-seq-len",
            "256",
            "--num-proc",
            "1",
        ]
    )
    data = sft.load_data(args, env["tok"])
    # ARC-Easy 6 + ARC-Challenge 6 + GSM8K 10 + SmolTalk 10 + identity 10 + spelling 10 + 10, cut to --max-rows
    assert len(data) == 10
    full = sft.parse_args(
        ["--model", env["base"], "--out", str(tmp_path), *env["sources"], "--max-seq-len", "256", "--num-proc", "1"]
    )
    contents = [m[0]["content"] for m in sft.load_data(full, env["tok"])["messages"]]
    assert sum(c.startswith("Multiple Choice question:") for c in contents) == 12
    assert len(contents) == 12 + 12 + 12  # ARC 12, GSM8K 12, SmolTalk 12


def test_non_finite_loss_stops_the_run(env, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(env["base"], trust_remote_code=True)
    optimizer = build_optimizer(model, unembedding_lr=0.0)  # group 0, lm_head, at 0: lrm comes from the next group
    schedule = NanochatSchedule(optimizer, num_steps=4, warmdown_ratio=1.0, momentum_warmup_steps=0)
    optimizer.step()
    schedule.step()
    callback, control = MetricsCallback(tmp_path / "metrics.jsonl"), TrainerControl()
    state = TrainerState()
    state.global_step = 3
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, control, model=model)
    optimizer.step()  # the second of 4 steps: 1 - 1/4 of the rates
    callback.on_optimizer_step(args, state, control, optimizer=optimizer)
    schedule.step()
    callback.on_log(args, state, control, logs={"loss": 2.0, "learning_rate": 0.0})
    assert not control.should_training_stop and callback.failed is None
    control.should_save = True  # a save step
    callback.on_log(args, state, control, logs={"loss": float("nan"), "learning_rate": 0.0})
    assert control.should_training_stop and callback.failed == "step 3: loss is nan"
    assert not control.should_save
    assert [(r["lrm"], r["lr"]) for r in metrics(tmp_path)] == [(0.75, 0.0), (0.75, 0.0)]


def test_metrics_report_mfu_from_real_tokens_per_second(env, tmp_path, monkeypatch):
    """MFU = nanochat FLOPs/token at the row length x TRL's real-token rate / the peak of every process's GPU. CPUs
    have no peak (no MFU is logged there), so the test gives this one a made-up peak of 1 TFLOP/s."""
    monkeypatch.setattr(sft_utils, "peak_flops", lambda device: 1e12)
    model = AutoModelForCausalLM.from_pretrained(env["base"], trust_remote_code=True)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=128)
    callback, control, state = MetricsCallback(tmp_path / "metrics.jsonl"), TrainerControl(), TrainerState()
    callback.on_train_begin(args, state, control, model=model)
    callback.on_log(args, state, control, logs={"loss": 2.0, "learning_rate": 0.1, "num_tokens": 1000})
    callback.t0 -= 2.0  # the next log comes 2 s and 3,000 real tokens later
    state.global_step = 1
    callback.on_log(args, state, control, logs={"loss": 1.5, "learning_rate": 0.1, "num_tokens": 4000})
    first, second = metrics(tmp_path)
    assert "mfu" not in first  # no rate before the second log
    assert second["tok_per_sec"] == pytest.approx(1500, rel=1e-3)
    assert second["mfu"] == pytest.approx(100 * model.estimate_flops(128) * second["tok_per_sec"] / 1e12)


def write_gsm8k(folder: Path) -> None:
    """300 problems in GSM8K's layout (question, answer with a calculator call and `#### n`)."""
    rng = random.Random(3)
    write_jsonl(
        folder / "train.jsonl",
        [
            {
                "question": f"{words(rng, 10, 30)} {i}?",
                "answer": f"{words(rng, 5, 15)} <<{i}*3={i * 3}>>{i * 3}.\n#### {i * 3}",
            }
            for i in range(300)
        ],
    )


def test_sft_throughput_bench_runs_the_stage_on_a_fresh_base(tmp_path):
    """bench/sft_throughput.py: GSM8K (local layout) -> tokenizer + freshly initialised base -> train/sft.py -> medians
    of its metrics. CPU has no MFU; the pretraining-step half is the pretrain benchmark, which has its own test."""
    write_gsm8k(tmp_path / "gsm8k")
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "sft_throughput.py"),
        "--gsm8k",
        str(tmp_path / "gsm8k"),
        "--depth",
        "2",
        "--max-seq-len",
        "256",
        "--max-rows",
        "32",
        "--vocab-size",
        "512",
        "--skip-steps",
        "1",
        "--no-pretrain",
        "--jsonl",
        str(tmp_path / "out.jsonl"),
        "--",
        "--device-batch-size",
        "4",
        "--examples-per-step",
        "8",
        "--num-proc",
        "1",
    ]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert result["loop"] == "SFTTrainer (sft)" and result["steps"] == 32 // 8 and result["timed_steps"] == 3
    assert result["tok_per_sec"] > 0 and result["mfu_pct"] is None and result["device"] == "cpu"


def test_sft_throughput_bench_profiles_the_trainer_steps_in_process(env, tmp_path):
    """--profile: train/sft.py's own build, in the bench's process, with the profiler on two steps; it prints where a
    step's time went (on a CPU: the host's part; the GPU lines need CUDA). --tokenizer: a given tokenizer, not one
    trained on the problems."""
    write_gsm8k(tmp_path / "gsm8k")
    cmd = [sys.executable, str(ROOT / "bench" / "sft_throughput.py"), "--gsm8k", str(tmp_path / "gsm8k"),
           "--stage", "midtrain", "--depth", "2", "--max-seq-len", "128", "--tokenizer", env["base"],
           "--max-rows", "40", "--skip-steps", "1", "--no-pretrain", "--profile", "--profile-steps", "2",
           "--total-batch-size", "256", "--", "--device-batch-size", "2", "--num-proc", "1"]  # fmt: skip
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env_vars)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wall time of one step:" in r.stdout and "host self time:" in r.stdout
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith('{"loop"')))
    assert result["loop"] == "SFTTrainer (midtrain)" and result["total_batch"] == 256
    assert result["vocab"] == 512 and result["tok_per_sec"] > 0


# -- bad input -------------------------------------------------------------------------------------------------------


def test_bad_input_fails_before_training(env, tmp_path):
    def build(script, *flags):
        script.build(
            script.parse_args(
                [
                    "--model",
                    env["base"],
                    "--out",
                    str(tmp_path / "x"),
                    "--num-proc",
                    "1",
                    "--max-seq-len",
                    "128",
                    *flags,
                ]
            )
        )

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(env["convs"][0]) + "\n" + json.dumps([{"role": "user", "content": "hi"}]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: .*ends with a user message"):
        build(sft, "--data", str(bad))
    with pytest.raises(ValueError, match=r"bad.jsonl line 2"):
        build(midtrain, "--data", str(bad), "--device-batch-size", "1", "--total-batch-size", "128")
    long = write_jsonl(
        tmp_path / "long.jsonl",
        env["convs"][:3]
        + [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": words(random.Random(1), 200, 200)}]],
    )
    with pytest.raises(ValueError, match=r"long.jsonl: conversation 3 .* more than the context of 128"):
        build(sft, "--data", long)
    no_messages = write_jsonl(tmp_path / "smol" / "train.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match=r"SmolTalk .* needs \['messages'\]"):
        build(sft, f"--source=smoltalk={no_messages}", *env["sources"][1:])
    with pytest.raises(ValueError, match="expected TASK=PATH"):
        build(sft, "--source", "wiki=/tmp")
    with pytest.raises(ValueError, match="nothing to train on"):
        build(sft, "--no-recipe")
    with pytest.raises(SystemExit):  # argparse: "argument --max-rows: expected a positive integer, got 0"
        build(sft, "--data", env["data"], "--max-rows", "0")
    # flags the chosen optimizer or data would ignore
    with pytest.raises(ValueError, match="--lr is the --optimizer adamw rate"):
        build(sft, "--lr", "1e-3", "--data", env["data"])
    with pytest.raises(ValueError, match=r"--matrix-lr: Muon rates, unused by AdamW \(--optimizer adamw\)"):
        build(sft, "--optimizer", "adamw", "--matrix-lr", "0.01", "--data", env["data"])
    with pytest.raises(ValueError, match=r"--embedding-lr, --unembedding-lr: Muon rates, unused by AdamW \(--lora"):
        build(sft, "--lora", "--embedding-lr", "0.1", "--unembedding-lr", "0.001", "--data", env["data"])
    for flags in (["--optimizer", "adamw"], ["--lora"]):
        with pytest.raises(ValueError, match="--lr-scale scales the Muon"):
            build(sft, "--lr-scale", "0.1", "--data", env["data"], *flags)
    for flag in ("--lora-rank", "--lora-alpha"):
        with pytest.raises(ValueError, match="they need --lora"):
            build(sft, flag, "8", "--data", env["data"])
    identity_file = write_jsonl(tmp_path / "identity.jsonl", env["convs"][:2])
    for flags in (["--identity-file", identity_file], ["--identity", "--identity-file", identity_file], []):
        with pytest.raises(ValueError, match="--identity-name names the generated identity conversations"):
            build(sft, "--identity-name", "Zed", "--data", env["data"], *flags)
    with pytest.raises(ValueError, match="--lora trains adapters with AdamW"):
        build(sft, "--lora", "--optimizer", "muon", "--data", env["data"])
    with pytest.raises(ValueError, match="longer than the model's context"):
        build(sft, "--max-seq-len", "512", "--data", env["data"])
    with pytest.raises(ValueError, match="not divisible"):
        build(sft, "--examples-per-step", "6", "--data", env["data"])
    with pytest.raises(ValueError, match="not divisible"):
        build(midtrain, "--total-batch-size", "1000", "--data", env["data"])
    with pytest.raises(ValueError, match="not a folder"):
        sft.build(sft.parse_args(["--model", str(tmp_path / "nope"), "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="no checkpoint"):
        sft.main(["--model", env["base"], "--out", str(tmp_path / "fresh"), "--data", env["data"], "--resume"])
