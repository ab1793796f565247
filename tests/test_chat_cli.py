"""`python -m hfnanochat.chat` in a subprocess, on a tiny saved model whose greedy reply is a scripted tool call."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import encode, scripted_model, syllable_text, tool_script
from transformers import AutoConfig, AutoTokenizer

from hfnanochat import HFNanoChatForCausalLM
from hfnanochat.chat import Chat, StreamPrinter, parse_args
from hfnanochat.inference.engine import Engine
from hfnanochat.tokenizer import get_special_token_ids, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
REPLY = "[python] 12*7 -> 84\n done\n"  # what the scripted model answers to any message


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder like a real checkpoint: weights + config + remote code + tokenizer. The model answers every message
    with the python call 12*7 and, after the forced output, " done" (max_position_embeddings 128)."""
    out = tmp_path_factory.mktemp("chat_model")
    tokenizer = train_tokenizer(syllable_text(), vocab_size=512)
    scripted_model(tokenizer, *tool_script(tokenizer, "12*7")).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# 20 new tokens: the 128-token context must leave room for the prompt (a later --max-new-tokens overrides it)
CLI = [sys.executable, "-m", "hfnanochat.chat", "--device", "cpu", "--max-new-tokens", "20"]


def chat(*args, stdin=b""):
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, env=ENV, timeout=120)


def test_one_shot_streams_the_reply_and_shows_the_tool_call(model_dir):
    r = chat("--model", str(model_dir), "-p", "what is 12 times 7", "--temperature", "0")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == REPLY
    assert b"Traceback" not in r.stderr and b"[notice]" not in r.stderr


def test_over_long_prompt_is_cut_from_the_left_with_a_notice(model_dir):
    long_prompt = " ".join(syllable_text(n_docs=10))  # ~2,000 tokens against a 128-token context
    r = chat("--model", str(model_dir), "-p", long_prompt, "--temperature", "0")
    assert r.returncode == 0, r.stderr.decode()
    assert "[notice] the conversation is" in r.stderr.decode() and "the model sees 108" in r.stderr.decode()
    assert r.stdout.decode() == REPLY  # the reply still comes: the prompt's end (<|assistant_start|>) was kept


def test_interactive_two_turns_empty_and_non_utf8_lines_then_eof(model_dir):
    stdin = b"\n   \n" + b"caf\xe9 latin-1\n" + b"what is 12 times 7\n" + b"and again?\n"
    r = chat("--model", str(model_dir), "--temperature", "0", stdin=stdin)
    assert r.returncode == 0, r.stderr.decode()
    out, err = r.stdout.decode(), r.stderr.decode()
    assert out.count("Assistant: " + REPLY) == 2  # two turns, each streamed
    assert out.count("User: ") == 6  # 2 empty + 1 undecodable re-prompt, 2 turns, and the prompt that met EOF
    assert err.count("[error] empty message") == 2
    assert "[error] that line is not valid UTF-8 (invalid continuation byte: b'\\xe9'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [(["-p", "  "], "-p/--prompt is empty"), (["--no-such-flag"], "unrecognized arguments: --no-such-flag")],
    ids=["empty-prompt", "unknown-flag"],
)
def test_empty_prompt_and_invalid_flag_exit_with_argparse_errors(model_dir, args, message):
    r = chat("--model", str(model_dir), *args)
    assert r.returncode == 2 and message in r.stderr.decode(), r.stderr.decode()
    assert b"Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "argument --temperature: expected a number >= 0, got -1"),
        (["--temperature", "warm"], "expected a number >= 0, got 'warm'"),
        (["--top-k", "-3"], "argument --top-k: expected an integer >= 0, got -3"),
        (["--top-p", "1.5"], "argument --top-p: expected a fraction in (0, 1], got 1.5"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer, got 0"),
        (["-p", "caf\udce9"], "-p/--prompt is not valid UTF-8"),  # how Python hands over a non-UTF-8 argv byte
        (["--device", "gpu7"], "--device"),
    ],
)
def test_flag_values_are_checked(capsys, args, message):
    """The same parser in-process (a subprocess per flag would cost seconds of imports each)."""
    from hfnanochat.chat import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "unused", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    from hfnanochat.chat import main
    from hfnanochat.cli import run

    assert run(main, ["--model", str(tmp_path / "no_such_model"), "-p", "hi", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: --model {tmp_path / 'no_such_model'}: no such folder\n"
    assert run(main, ["--model", str(tmp_path), "--tokenizer", "out/tok/", "-p", "hi", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: --tokenizer out/tok/: no such folder\n"
    (tmp_path / "empty").mkdir()
    assert run(main, ["--model", str(tmp_path / "empty"), "-p", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --model {tmp_path / 'empty'}: no tokenizer.json there (pass --tokenizer FOLDER)\n"


def test_ctrl_c_exits_without_a_traceback(model_dir):
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen([*CLI, "--model", str(model_dir)], env=ENV, **pipes)
    try:
        banner = proc.stdout.readline()  # printed once the model is loaded and the chat waits for input
        assert banner.startswith(b"Chat with the model")
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def printed(tokenizer, stream):
    """What StreamPrinter shows for a reply given as (token, mask) pairs."""
    out = io.StringIO()
    printer = StreamPrinter(tokenizer, out)
    for token, mask in stream:
        printer.feed(token, mask)
    printer.finish()
    return out.getvalue()


def test_a_reply_that_ends_inside_a_python_call_still_shows_it(tokenizer):
    sp = get_special_token_ids(tokenizer)
    call = [(t, 1) for t in [*encode(tokenizer, "hi "), sp["python_start"], *encode(tokenizer, "12*7")]]
    # stopped inside the call: the stop token is not code
    assert printed(tokenizer, [*call, (sp["assistant_end"], 1)]) == "hi \n[python] 12*7 (unfinished)\n"
    assert printed(tokenizer, call) == "hi \n[python] 12*7 (unfinished)\n"  # cut by --max-new-tokens
    forced = [(t, 0) for t in [sp["output_start"], *encode(tokenizer, "8")]]  # cut inside the forced "84"
    assert printed(tokenizer, [*call, (sp["python_end"], 1), *forced]) == "hi \n[python] 12*7 -> 8 (unfinished)\n"


def test_messages_are_stripped_like_nanochat(model_dir, tokenizer):
    model = HFNanoChatForCausalLM.from_pretrained(model_dir).eval()
    args = parse_args(["--model", str(model_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "20"])
    out = io.StringIO()
    chat = Chat(Engine(model, tokenizer), tokenizer, args, out, io.StringIO())
    chat.reply(" \twhat is 12 times 7  \n")  # how -p and a typed line can arrive
    padded = chat.tokens
    chat.clear()
    chat.reply("what is 12 times 7")
    assert chat.tokens == padded and out.getvalue() == REPLY * 2


def test_default_reply_length_fits_a_small_context(model_dir, capsys):
    """The README's `python -m hfnanochat.chat --model out/pretrain/final -p hello` on the tiny preset's model: the
    default reply length is cut to half the context, and the CLI says so instead of failing."""
    from hfnanochat.chat import main

    context = AutoConfig.from_pretrained(model_dir, trust_remote_code=True).max_position_embeddings
    assert context < 2 * 256  # the default of 256 would not leave room for a prompt
    assert main(["--model", str(model_dir), "-p", "hello", "--device", "cpu", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"replies stop at {context // 2} tokens, half of this model's {context}-token context" in err
