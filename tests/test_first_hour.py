"""A user's first hour: each bad input ends in one line `error: ...` on stderr and exit code 2, and leaves every file
on disk as it was; the README's path works on the tiny preset's model.

The entry points run in this process through `hfnanochat.cli.run`, as `python train/...` runs them."""

import hashlib
import importlib.util
import json
import random
import re
import string
from pathlib import Path

import pytest
from test_engine import random_model, tiny_config

from hfnanochat import chat, convert
from hfnanochat.cli import run
from hfnanochat.tokenizer import train_tokenizer
from hfnanochat.training.data import DocumentStream
from hfnanochat.training.export import save_final

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"first_hour_{name}", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain, sft = _script("pretrain"), _script("sft")


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its hash: "nothing changed" means this is equal before and after."""
    if not folder.exists():
        return {}
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fails(capsys, main, argv, message, watched: Path):
    before = snapshot(watched)
    try:
        code = run(main, argv)
    except SystemExit as e:  # argparse's usage errors exit by themselves
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # progress bars may come before it
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert snapshot(watched) == before
    return err


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A final folder as a stage writes it: tiny random model, 512-token tokenizer, context 256."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(400)]
    tok = train_tokenizer([" ".join(rng.choices(words, k=12)) + f" {i}" for i in range(2000)], vocab_size=512)
    model = random_model(tiny_config(vocab_size=len(tok), max_position_embeddings=256))
    folder = tmp_path_factory.mktemp("first_hour") / "final"
    return save_final(model, tok, folder)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--total-batch-size", "-4096"], "argument --total-batch-size: expected a positive integer, got -4096"),
        (["--num-iterations", "-5"], "argument --num-iterations: expected a positive integer, got -5"),
        (["--device-batch-size", "0"], "argument --device-batch-size: expected a positive integer, got 0"),
        (["--activation-memory-budget", "1.5"], "argument --activation-memory-budget: expected a fraction in (0, 1]"),
        (["--eval-every", "-1"], "argument --eval-every: expected an integer >= 0, got -1"),
    ],
    ids=["negative-batch", "negative-steps", "zero-rows", "budget", "eval-every"],
)
def test_pretrain_numbers_are_checked_before_anything_runs(capsys, tmp_path, flags, message):
    out = tmp_path / "run"
    fails(capsys, pretrain.main, ["--preset", "tiny", "--out", str(out), *flags], message, tmp_path)
    assert not out.exists()


def test_pretrain_refuses_an_output_folder_that_holds_a_run(capsys, tmp_path):
    out = tmp_path / "pretrain"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"weights of a finished run")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 61)))
    message = f"{out} already holds a pretraining run (final, metrics.jsonl): pass --resume to continue it"
    fails(capsys, pretrain.main, ["--preset", "tiny", "--out", str(out)], message, tmp_path)
    fails(capsys, pretrain.main, ["--out", str(out), "--resume", "--overwrite"], "pick one", tmp_path)


def test_sft_checks_its_numbers_and_its_model_folder(capsys, tmp_path, model_folder):
    out = tmp_path / "sft"
    message = "argument --device-batch-size: expected a positive integer, got -2"
    fails(
        capsys,
        sft.main,
        ["--model", str(model_folder), "--out", str(out), "--device-batch-size", "-2"],
        message,
        tmp_path,
    )
    fails(
        capsys,
        sft.main,
        ["--model", "out/nothing/final", "--out", str(out)],
        "--model out/nothing/final: no such folder",
        tmp_path,
    )
    fails(
        capsys,
        sft.main,
        ["--mixture", "mid", "--examples-per-step", "8", "--model", str(model_folder), "--out", str(out)],
        "--examples-per-step does not apply to --mixture mid",
        tmp_path,
    )
    assert not out.exists()  # no empty checkpoints folder left behind


def test_sft_offline_hub_is_one_line(capsys, tmp_path, model_folder, monkeypatch):
    """The README's mid-training command on a machine without internet: one line that says what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    argv = ["--mixture", "mid", "--model", str(model_folder), "--out", str(tmp_path / "mid"), "--num-proc", "1"]
    err = fails(capsys, sft.main, argv, "could not reach the Hugging Face Hub for dataset", tmp_path)
    assert "--preset tiny" in err


def test_sft_on_your_own_data_trains_on_all_of_it(capsys, tmp_path, model_folder):
    """`--preset tiny --no-recipe --data mine.jsonl`: the preset's generated tasks don't crowd out your 40
    conversations, and the run says what the mixture holds."""
    mine = tmp_path / "mine.jsonl"
    rows = [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(40)
    ]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = sft.parse_args(
        [
            "--preset",
            "tiny",
            "--no-recipe",
            "--data",
            str(mine),
            "--model",
            str(model_folder),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    from transformers import AutoTokenizer

    data = sft.load_data(args, AutoTokenizer.from_pretrained(model_folder))
    assert len(data) == 40 and sorted(m[0]["content"] for m in data["messages"]) == sorted(
        r[0]["content"] for r in rows
    )
    assert f"mixture: {mine} 40\n" in capsys.readouterr().out


def test_non_utf8_data_names_the_file(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_bytes(b"a fine first paragraph\n\n" + bytes(range(128, 256)) * 4)
    with pytest.raises(ValueError, match=rf"{data}: not UTF-8 text"):
        list(DocumentStream(str(data), split="train", world_size=1))


def test_a_damaged_model_folder_names_the_file(capsys, tmp_path, model_folder):
    damaged = tmp_path / "final"
    damaged.mkdir()
    for f in model_folder.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    message = f"{weights} has 100 bytes, {(model_folder / 'model.safetensors').stat().st_size} were written"
    fails(capsys, chat.main, ["--model", str(damaged), "-p", "hi", "--device", "cpu"], message, tmp_path)
    fails(capsys, sft.main, ["--model", str(damaged), "--out", str(tmp_path / "sft")], message, tmp_path)


def test_convert_refuses_to_replace_a_folder_silently(capsys, tmp_path, model_folder):
    out = tmp_path / "native"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(
        capsys,
        convert.main,
        ["hf-to-native", str(model_folder), str(out)],
        "already holds a model folder (notes.txt)",
        tmp_path,
    )
    assert run(convert.main, ["hf-to-native", str(model_folder), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_tracebacks_stay_for_bugs(tmp_path, monkeypatch):
    """A user error is one line; HFNANOCHAT_TRACEBACK=1 shows where it came from; anything else is a bug."""
    monkeypatch.setenv("HFNANOCHAT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run(chat.main, ["--model", str(tmp_path / "nope"), "-p", "hi", "--device", "cpu"])
    monkeypatch.delenv("HFNANOCHAT_TRACEBACK")

    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run(buggy, [])


def test_chat_default_fits_the_tiny_context(capsys, model_folder):
    assert run(chat.main, ["--model", str(model_folder), "-p", "hello", "--device", "cpu", "--temperature", "0"]) == 0
    assert "replies stop at 128 tokens, half of this model's 256-token context" in capsys.readouterr().err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: 20)" in text and "(default: 20) (default" not in text and "default 20)" not in text


def test_a_final_folder_ships_pytorch_and_transformers_code_only(model_folder):
    """What `auto_map` sends with a checkpoint: the modeling and configuration files, no Triton or decode kernels."""
    code = sorted(p.name for p in model_folder.glob("*.py"))
    assert code == ["configuration_hfnanochat.py", "modeling_hfnanochat.py"]
    for path in model_folder.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"import triton|from triton|triton\.|decode_kernels|fast_decode", text), path
