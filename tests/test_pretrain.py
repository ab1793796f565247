"""train/pretrain.py end to end on a tiny model: loss falls, exact resume, 1 vs 2 processes, bad input, NaN, final
folder.

Every run trains a depth-2 model (width 128, ~0.5M parameters) on 64-token rows, 512 tokens per step: 4 micro-steps of
2 rows on one process. The corpus is ~300 KB of seeded word salad written by the test, and the 512-token tokenizer is
trained on it once per module, so nothing here needs /work/shared or the network.
"""

import importlib.util
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hfnanochat import HFNanoChatForCausalLM
from hfnanochat.tokenizer import save_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a of and to in is was for on with as by at from that this it he she they we you king queen lord house "
    "river stone light night day morning water fire earth wind sword crown ship sea land city gate tower road "
    "garden letter song voice heart mind hand eye face word name time year friend enemy soldier child mother "
    "father brother sister old young great small dark bright cold warm long short quiet loud strange true false "
    "good evil walks runs speaks sees hears keeps takes gives finds loses holds brings calls tells knows thinks "
    "feels comes goes"
).split()
# The tiny model; --sample-every 0 and --no-core keep each run to training and evaluation. 256 validation tokens per
# evaluation: the ~20 held-out paragraphs (every 100th) fill 2 batches of 2 x 64 per stream.
TINY = [
    "--depth",
    "2",
    "--max-seq-len",
    "64",
    "--device-batch-size",
    "2",
    "--total-batch-size",
    "512",
    "--eval-tokens",
    "256",
    "--sample-every",
    "0",
    "--no-core",
    "--no-compile",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_pretrain_script", ROOT / "train" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = _load_script()


def make_corpus(n_chars: int, seed: int = 0) -> str:
    """Paragraphs of 1-5 sentences separated by blank lines (one document each), with some numbers and punctuation."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_chars:
        sentences = []
        for _ in range(rng.randint(1, 5)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
            sentences.append(
                words[0].upper()
                + words[1:]
                + rng.choice(".!?;")
                + (f" {rng.randint(1, 2000)}" if rng.random() < 0.2 else "")
            )
        paragraphs.append(" ".join(sentences))
        size += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(corpus.txt, tokenizer folder): ~300 KB, ~2,000 paragraphs, a 512-token BPE trained on them."""
    root = tmp_path_factory.mktemp("pretrain_data")
    corpus = root / "corpus.txt"
    corpus.write_text(make_corpus(300_000), encoding="utf-8")
    tokenizer = train_tokenizer(corpus.read_text(encoding="utf-8").split("\n\n"), vocab_size=512)
    return corpus, save_tokenizer(tokenizer, root / "tok")


def run(data, out, *flags):
    corpus, tok = data
    pretrain.main(["--data", str(corpus), "--tokenizer", str(tok), "--out", str(out), *TINY, *flags])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_names(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 30-step run (evaluated only at the end), shared by the loss and final-folder tests."""
    out = tmp_path_factory.mktemp("trained")
    run(data, out, "--num-iterations", "30", "--eval-every", "0", "--save-every", "0")
    return out


def test_loss_falls(trained):
    records = metrics(trained)
    assert [r["step"] for r in records] == list(range(1, 31))
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # ln(512) = 6.24 at init (zero-initialised head); 30 steps of word salad reach ~3.8
    assert math.isclose(losses[0], math.log(512), abs_tol=1e-3)
    assert last < first - 1.0, (first, last)
    assert step_names(trained) == ["step_000030"]  # --save-every 0 still saves the last step


@pytest.mark.slow  # compiling a depth-2 model on CPU: ~30-60 s
def test_compiled_run_saves_plain_names_and_resumes(data, tmp_path):
    """GPU runs compile the model: checkpoints and the final folder must still carry the plain module's weight
    names (no `_orig_mod.`), and --resume must load them back into the compiled model."""
    corpus, tok = data
    flags = [
        "--data",
        str(corpus),
        "--tokenizer",
        str(tok),
        *TINY[:-1],
        "--compile",
        "--num-iterations",
        "2",
        "--eval-every",
        "0",
        "--save-every",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    pretrain.main(flags)
    for folder in (tmp_path / "run/final", tmp_path / "run/checkpoints/step_000001/model"):
        names = set(load_file(folder / "model.safetensors"))
        assert "model.embed_tokens.weight" in names and not any("_orig_mod" in n for n in names)
    straight = [r["loss"] for r in metrics(tmp_path / "run")]
    shutil.rmtree(tmp_path / "run/checkpoints/step_000002")
    pretrain.main([*flags, "--resume"])
    assert [r["loss"] for r in metrics(tmp_path / "run")] == straight


def test_final_folder_loads_with_auto_classes(trained):
    final = trained / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tokenizer) == 512
    assert (final / "token_bytes.pt").is_file()
    # the code travels with the weights (auto_map), so a process without hfnanochat can load the folder
    assert (final / "modeling_hfnanochat.py").is_file() and "AutoModelForCausalLM" in model.config.auto_map
    # the weights are the trained ones, not a fresh init: same tensors as the last checkpoint
    saved = load_file(trained / "checkpoints" / "step_000030" / "model" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # a chat template that renders nanochat's special tokens
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    assert tokenizer.decode(ids) == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>"
    # generation stops on <|assistant_end|> or <|bos|>, from generation_config.json
    generation = GenerationConfig.from_pretrained(final)
    end, bos = tokenizer.convert_tokens_to_ids(["<|assistant_end|>", "<|bos|>"])
    assert generation.eos_token_id == [end, bos] and generation.bos_token_id == bos
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out[0, : len(ids)].tolist() == ids and len(ids) < out.shape[1] <= len(ids) + 4


# ----------------------------------------------------------------------------------------------------------------
# exact resume


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """12 steps in one go, a checkpoint every 6, validation every 4 (so step 6 carries the bpb of step 4)."""
    out = tmp_path_factory.mktemp("straight")
    run(data, out, "--num-iterations", "12", "--eval-every", "4", "--save-every", "6")
    return out


def test_resume_is_bit_exact_after_a_crash(data, straight, tmp_path, capsys):
    # The crash: the run died during step 10, after the checkpoint of step 6. It left the metrics of steps 1-9 and
    # half a line, a half-written temporary checkpoint, and a step_ folder without trainer_state.json; a corrupted
    # checkpoint of step 8 lies beside them.
    out = tmp_path / "crashed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_000006", out / "checkpoints" / "step_000006")
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:9]) + "\n" + lines[9][:25])
    tmp = out / "checkpoints" / ".tmp_step_000009"
    shutil.copytree(straight / "checkpoints" / "step_000006" / "model", tmp / "model")
    partial = out / "checkpoints" / "step_000009"
    shutil.copytree(straight / "checkpoints" / "step_000006" / "model", partial / "model")
    shutil.copy(straight / "checkpoints" / "step_000006" / "optimizer.bin", partial / "optimizer.bin")
    # and a checkpoint with every file in place whose weights a full disk cut short: its manifest gives it away
    truncated = out / "checkpoints" / "step_000008"
    shutil.copytree(straight / "checkpoints" / "step_000006", truncated)
    weights = truncated / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    capsys.readouterr()
    run(data, out, "--num-iterations", "12", "--eval-every", "4", "--save-every", "6", "--resume")
    printed = capsys.readouterr().out
    assert f"skipping checkpoint step_000008: {weights} has 1000 bytes" in printed
    assert f"resumed from {out / 'checkpoints' / 'step_000006'} at step 6" in printed

    a, b = metrics(straight), metrics(out)
    assert [r["step"] for r in b] == list(range(1, 13))  # steps 7-9 redone, not duplicated; the cut line is gone
    for key in ("loss", "smooth_loss", "lrm", "val_bpb"):
        assert [r[key] for r in b] == [r[key] for r in a], key  # ==: bit for bit
    for name in ("final/model.safetensors", "checkpoints/step_000012/model/model.safetensors"):
        wa, wb = load_file(straight / name), load_file(out / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    # optimizer moments, RNG and data position at the end match too: the next step would also be identical
    opt_a = torch.load(straight / "checkpoints" / "step_000012" / "optimizer.bin", weights_only=False)
    opt_b = torch.load(out / "checkpoints" / "step_000012" / "optimizer.bin", weights_only=False)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in state.items())
    assert torch.load(straight / "checkpoints" / "step_000012" / "data_stream0.pt", weights_only=False) == torch.load(
        out / "checkpoints" / "step_000012" / "data_stream0.pt", weights_only=False
    )
    # the debris of the crash is gone, the two newest complete checkpoints are kept
    assert step_names(out) == ["step_000006", "step_000012"]


def test_resume_with_lower_learning_rates_uses_them(data, straight, tmp_path):
    """The way out of a divergence: resume the last good checkpoint with lower rates, and they take effect (the
    checkpoint's optimizer state would otherwise bring its own base rates back)."""
    out = tmp_path / "lower"
    shutil.copytree(straight / "checkpoints" / "step_000006", out / "checkpoints" / "step_000006")
    run(
        data,
        out,
        "--num-iterations",
        "7",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--resume",
        "--matrix-lr",
        "0.002",
        "--embedding-lr",
        "0.02",
        "--unembedding-lr",
        "0.0004",
    )
    state = torch.load(out / "checkpoints" / "step_000007" / "optimizer.bin", weights_only=False)
    base = torch.load(straight / "checkpoints" / "step_000006" / "optimizer.bin", weights_only=False)
    for group, old in zip(state["param_groups"], base["param_groups"]):
        if group["name"] != "scalars":  # the 2026 scalars' fixed rate does not follow the flags
            assert group["initial_lr"] == pytest.approx(old["initial_lr"] / 10), group["name"]


def test_resume_latest_without_a_complete_checkpoint(data, tmp_path):
    partial = tmp_path / "checkpoints" / "step_000003"
    (partial / "model").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        run(data, tmp_path, "--num-iterations", "6", "--resume", "latest")
    with pytest.raises(ValueError, match="not a complete checkpoint folder"):
        run(data, tmp_path, "--num-iterations", "6", "--resume", str(partial))


# ----------------------------------------------------------------------------------------------------------------
# one process vs two


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters over gloo plus two one-process runs: 10-20 s on 2 loaded cores
def test_two_processes_match_one(data, tmp_path):
    corpus, tok = data
    flags = [
        "--data",
        str(corpus),
        "--tokenizer",
        str(tok),
        *TINY,
        "--data-streams",
        "2",
        "--num-iterations",
        "8",
        "--eval-every",
        "4",
        "--save-every",
        "3",
        "--keep-checkpoints",
        "3",
    ]
    # `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` starts ONE process with accelerate 1.15
    # (MULTI_CPU goes to its simple launcher, which needs mpirun for more), so torchrun starts the two.
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
            str(_free_port()),
            str(ROOT / "train" / "pretrain.py"),
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
    assert "2 process(es) (MULTI_CPU), grad accumulation 2" in result.stdout
    pretrain.main([*flags, "--out", str(tmp_path / "one")])

    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    # The same global batch: every stream was read to the same position with the same buffered documents ...
    for s in (0, 1):
        state = [
            torch.load(tmp_path / run_ / "checkpoints" / "step_000008" / f"data_stream{s}.pt", weights_only=False)
            for run_ in ("one", "two")
        ]
        assert state[0] == state[1] and state[0]["documents"]["rank"] == s
    # ... so the first step (same weights, same 4 x 2 rows, mean of 4 losses in another order) and the validation bpb
    # at step 0 (same held-out rows, sums all-reduced) agree to float rounding ...
    assert abs(one[0]["loss"] - two[0]["loss"]) <= 1e-5
    assert abs(one[0]["val_bpb"] - two[0]["val_bpb"]) <= 1e-6
    # ... and so does the whole trajectory (the bar: 1e-5). Gradient sums run in another order (all-reduce vs.
    # accumulation); on CPU Muon orthogonalises in fp32, so that last-bit noise stays at float rounding. Two
    # processes that read other data, or that stepped per micro-batch (the grad-accumulation bug this guards
    # against), are off by >1e-2.
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= 1e-5
    assert abs(one[-1]["val_bpb"] - two[-1]["val_bpb"]) <= 1e-5

    # The two-process checkpoint of step 3 resumes on one process (grad accumulation 4 instead of 2) and goes on
    # like the two-process run. Accelerate's restored micro-step counter (3 steps x 2) would put the first
    # optimizer step of the resumed run after 2 micro-batches instead of 4.
    pretrain.main([*flags, "--out", str(tmp_path / "moved"), "--resume", str(tmp_path / "two/checkpoints/step_000003")])
    moved = metrics(tmp_path / "moved")
    assert [r["step"] for r in moved] == list(range(4, 9))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two[3:], moved)) <= 1e-5


@pytest.mark.slow  # two compiled runs of two processes each: ~1-2 min on 2 cores
def test_two_compiled_processes_resume(data, tmp_path):
    """On GPUs the model is compiled and DDP wraps the compiled module; accelerate's unwrap then stops at the
    compiled wrapper, and loading a checkpoint into it failed on `_orig_mod.` names (seen on 2 H200s)."""
    corpus, tok = data
    flags = [
        "--data",
        str(corpus),
        "--tokenizer",
        str(tok),
        *TINY[:-1],
        "--compile",
        "--data-streams",
        "2",
        "--num-iterations",
        "2",
        "--eval-every",
        "0",
        "--save-every",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]

    def launch(*extra):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(_free_port()), str(ROOT / "train" / "pretrain.py"), *flags, *extra],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
            env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    launch()
    straight = [r["loss"] for r in metrics(tmp_path / "run")]
    shutil.rmtree(tmp_path / "run/checkpoints/step_000002")
    assert "resumed from" in launch("--resume")
    assert [r["loss"] for r in metrics(tmp_path / "run")] == straight


# ----------------------------------------------------------------------------------------------------------------
# bad input: clear errors before the first step


def test_unknown_preset_is_an_argparse_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path, "--preset", "d7")
    assert e.value.code == 2 and "invalid choice: 'd7'" in capsys.readouterr().err


def test_preset_defaults_yield_to_explicit_flags():
    args = pretrain.parse_args(["--preset", "tiny", "--depth=2", "--num-iter", "5"])
    assert (args.depth, args.num_iterations, args.max_seq_len, args.compile) == (2, 5, 256, False)


def _jsonl(path, column):
    path.write_text("".join(json.dumps({column: f"row {i} of some text"}) + "\n" for i in range(300)))
    return path


@pytest.mark.parametrize(
    "case", ["no_text_files", "blank_txt", "text_column", "batch_split", "keep_checkpoints", "memory_budget"]
)
def test_bad_input_fails_before_training(data, tmp_path, case):
    corpus, tok = data
    out = tmp_path / "out"
    args = {"--data": str(corpus)}
    if case == "no_text_files":  # a folder of files that are not text
        (tmp_path / "raw").mkdir()
        (tmp_path / "raw" / "weights.bin").write_bytes(b"\0" * 64)
        args["--data"], match = str(tmp_path / "raw"), "holds no readable text files"
    elif case == "blank_txt":
        (tmp_path / "blank.txt").write_text("\n\n   \n\n")
        args["--data"], match = str(tmp_path / "blank.txt"), "has no rows"
    elif case == "text_column":
        args["--data"], args["--text-column"] = str(_jsonl(tmp_path / "rows.jsonl", "content")), "text"
        match = "has no column 'text'; its columns: content"
    elif case == "batch_split":  # 3 rows x 64 tokens never add up to 512
        args["--device-batch-size"], match = "3", "--total-batch-size 512 is not divisible by device batch 3"
    elif case == "keep_checkpoints":  # numbers are checked by argparse: "error: argument ..." and exit 2
        args["--keep-checkpoints"], match = "0", None
    else:
        args["--activation-memory-budget"], match = "1.5", None
    flags = [x for kv in args.items() for x in kv]
    with pytest.raises(ValueError if match else SystemExit, match=match) as raised:
        pretrain.main(["--tokenizer", str(tok), "--out", str(out), *TINY, "--num-iterations", "4", *flags])
    assert match or raised.value.code == 2
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_resume_with_another_depth_names_the_field(data, straight, tmp_path):
    out = tmp_path / "deeper"
    with pytest.raises(ValueError, match=r"num_hidden_layers \(--depth\): checkpoint 2 vs now 3"):
        run(
            data,
            out,
            "--num-iterations",
            "12",
            "--depth",
            "3",
            "--resume",
            str(straight / "checkpoints" / "step_000006"),
        )
    assert not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# a non-finite loss


@pytest.mark.parametrize("save_every", [4, 2])
def test_nan_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys, save_every):
    # --final-lr-frac inf: the LR is the normal one through step 5 (the flat part of the schedule) and infinite from
    # the first warm-down step on, so the update of step 6 turns the weights NaN. With a checkpoint every 4 steps the
    # NaN shows as the loss of step 7; with one every 2 the save at step 6 finds the NaN weights first.
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        run(
            data,
            out,
            "--num-iterations",
            "8",
            "--warmdown-ratio",
            "0.5",
            "--final-lr-frac",
            "inf",
            "--eval-every",
            "0",
            "--save-every",
            str(save_every),
        )
    assert e.value.code == 1
    good = out / "checkpoints" / "step_000004"
    message = capsys.readouterr().out
    reason = "step 7: loss is nan" if save_every == 4 else "step 6: the weights are not finite"
    assert reason in message and f"The last good checkpoint is {good}" in message
    assert step_names(out) == (["step_000004"] if save_every == 4 else ["step_000002", "step_000004"])
    assert not (out / "final").exists()
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in records)
    # the checkpoint is intact: it loads, and its weights are finite and give a finite loss
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 4
    model = HFNanoChatForCausalLM.from_pretrained(good / "model", dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(model(input_ids=torch.arange(64).view(1, 64), labels=torch.arange(64).view(1, 64)).loss.item())


def test_metrics_log_survives_an_overwritten_run_folder(tmp_path):
    """--overwrite empties the run folder (clear_output); the stage's first metrics line must find it, not fail
    with 'No such file or directory' (the RL stage did, after a speedrun resumed it without a checkpoint)."""
    from hfnanochat.cli import clear_output
    from hfnanochat.training.metrics import append_jsonl

    run = tmp_path / "rl"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    clear_output(run)
    append_jsonl(run / "metrics.jsonl", {"step": 1, "reward": 0.5})
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "reward": 0.5}
    ]
