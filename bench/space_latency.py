"""The Space's latency as its users see it: time to first token and tokens/s, for 1 and 8 users chatting at once.

    python bench/space_latency.py --depth 20 --tokenizer out/tokenizer                # d20 at init, on the GPU
    python bench/space_latency.py --model out/sft/final                               # a trained model
    python bench/space_latency.py --url http://127.0.0.1:7860/ --model out/sft/final  # an app that already runs
    python bench/space_latency.py --depth 2 --new-tokens 16 --requests 1 --users 1,2  # smoke run on CPU

Without --url the script starts `spaces_app/app.py` itself (on a free loopback port, HFNANOCHAT_CONCURRENCY = the
largest user count, so no user waits in the queue) and stops it at the end. Without --model it first writes a
model folder of nanochat's init at --depth, its head set to repeat one word, through `save_final` (the tokenizer
from --tokenizer, or a small one trained on generated text for a smoke run). Each user is a gradio_client `Client`
that sends --requests messages, each in a new conversation, through the app's `/chat` endpoint as the browser does,
and streams the reply:
- time to first token (TTFT): from sending the message to the first non-empty partial reply;
- tokens/s per user: the reply's tokens after the first, over the time from the first partial to the last;
- tokens/s total: every reply's tokens over the wall time of the whole round.
- server_*: medians of the app's own `[reply]` log lines (the engine's tok/s and first token, before Gradio
  delivers them); without --url only.
Tokens are the reply's text encoded again by the model's tokenizer (the stream carries text, not ids). The --depth
model repeats one word token, so its replies are exactly --new-tokens tokens and re-encode exactly (see
`repeating_model_folder`); for a trained --model the count is the re-encoded text's.
One JSON line per user count on stdout (and appended to --jsonl).
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder or Hub id (default: a random --depth model)")
    p.add_argument("--depth", type=int, default=20, help="depth of the init-weight model when --model is not given")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the --depth model (default: a tiny one)")
    p.add_argument("--url", default=None, help="a running app; without it the script starts spaces_app/app.py")
    p.add_argument("--users", default="1,8", help="comma-separated concurrent user counts")
    p.add_argument("--requests", type=int, default=3, help="messages per user per round")
    p.add_argument("--new-tokens", type=int, default=256, help="the reply's max new tokens")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--prompt", default="Tell me a long story about a robot who learns to paint.")
    p.add_argument("--compile", action="store_true", help="HFNANOCHAT_COMPILE=1: compiled decode, replies serialized")
    p.add_argument("--jsonl", default=None, help="also append the JSON lines to this file")
    p.add_argument("--round-timeout", type=float, default=300, help="seconds a round may take before it is reported")
    args = p.parse_args(argv)
    try:
        args.users = [int(u) for u in args.users.split(",")]
    except ValueError:
        p.error(f"--users must be comma-separated integers, got {args.users!r}")
    if min(args.users) < 1 or args.requests < 1 or args.new_tokens < 1:
        p.error("--users, --requests and --new-tokens must be >= 1")
    if args.url and not args.model:
        p.error("--url needs --model too (its tokenizer counts the reply's tokens)")
    return args


def repeating_model_folder(depth: int, tokenizer_dir: str | None, out: Path, context: int) -> Path:
    """nanochat's init at `depth`, its head set so that every reply repeats one word token: the compute of a real
    model of that size (the same matmuls), and replies of exactly --new-tokens tokens that re-encode to as many, so
    the stream's text counts the tokens exactly. (Uniform sampling from random weights would make byte fragments
    that re-encode to other counts, and stop early now and then.)"""
    import torch
    from transformers import AutoTokenizer

    from hfnanochat import HFNanoChatForCausalLM, config_for_depth
    from hfnanochat.tokenizer import get_special_token_ids, train_tokenizer
    from hfnanochat.training.export import save_final

    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:  # smoke runs: a small BPE on generated words
        import random

        rng = random.Random(0)
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(12000)]
        docs = [" ".join(words[i : i + 40]) + f" {rng.randint(0, 999)}" for i in range(0, 12000, 40)]
        tokenizer = train_tokenizer(docs, vocab_size=512)
    # a word token (" the" in a real vocabulary) whose repetition encodes back to one token per word
    word = next(
        i
        for i in range(len(tokenizer))
        if (w := tokenizer.decode([i])).startswith(" ")
        and w[1:].isalpha()
        and tokenizer.encode(w * 4, add_special_tokens=False) == [i] * 4
    )
    config = config_for_depth(depth, vocab_size=len(tokenizer), max_seq_len=context)
    model = HFNanoChatForCausalLM.from_config_on_device(config, "cpu").eval()
    # the blocks' output projections start at zero, so the last hidden state is the normed embedding of the current
    # token: a head row along <|assistant_start|>'s and the word's own embedding makes the word follow both
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        head.zero_()
        for source in (get_special_token_ids(tokenizer)["assistant_start"], word):
            head[word] += 3.0 * emb[source] / emb[source].norm()
    return save_final(model, tokenizer, out / "final")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, concurrency: int, new_tokens: int, compile: bool) -> tuple[subprocess.Popen, str, list]:
    """The app on a free loopback port: its process, URL and output lines (read on as it runs)."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HFNANOCHAT_MODEL=model,
        PORT=str(port),
        HFNANOCHAT_CONCURRENCY=str(concurrency),
        HFNANOCHAT_MAX_NEW_TOKENS=str(new_tokens),
        HFNANOCHAT_TIMEOUT="600",
        HFNANOCHAT_COMPILE="1" if compile else "0",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "spaces_app" / "app.py")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True).start()
    deadline = time.time() + 600
    while not any(b"Running on local URL" in line for line in lines):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit("error: the app did not start:\n" + b"".join(lines).decode(errors="replace")[-3000:])
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}/", lines


def one_reply(client, args) -> tuple[float, float, float, str, int]:
    """(sent, first partial, last partial) times, the final text and the number of partials of one streamed reply."""
    sent = time.perf_counter()
    job = client.submit(args.prompt, args.temperature, args.top_k, args.new_tokens, api_name="/chat")
    first = last = None
    text, partials = "", 0
    for partial in job:
        if isinstance(partial, str) and partial:
            last = time.perf_counter()
            first = first or last
            text = partial
            partials += 1
    text = job.result() or text
    return sent, first or time.perf_counter(), last or time.perf_counter(), text, partials


def round_of(users: int, url: str, tokenizer, args) -> dict:
    from gradio_client import Client

    clients = [Client(url, verbose=False, httpx_kwargs={"timeout": 600}) for _ in range(users)]
    one_reply(clients[0], args)  # warm-up: first-call allocations (and compilation with --compile)
    clients[0].reset_session()
    records, errors = [], []

    def user(client):
        try:
            for _ in range(args.requests):
                sent, first, last, text, partials = one_reply(client, args)
                client.reset_session()  # a new conversation: every request has the same prompt
                plain = text.replace("`[python] ", "[python] ").replace("``", "")
                tokens = len(tokenizer.encode(plain, add_special_tokens=False))
                records.append((sent, first, last, partials, tokens))
        except Exception as e:  # reported after the round
            errors.append(repr(e))

    threads = [threading.Thread(target=user, args=(c,), daemon=True) for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, start + args.round_timeout - time.perf_counter()))
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"error: {len(errors)} users failed: {errors[:3]}")
    if not records:
        raise SystemExit(f"error: no reply finished within --round-timeout {args.round_timeout:g} s ({users} users)")
    ttft = sorted(1000 * (first - sent) for sent, first, *_ in records)
    per_user = [(n - 1) / (last - first) for _, first, last, _, n in records if n > 1 and last > first]
    return dict(
        users=users,
        replies=len(records),
        replies_expected=users * args.requests,
        new_tokens=args.new_tokens,
        mean_reply_tokens=round(statistics.mean(n for *_, n in records), 1),
        # partial replies the client saw per reply: about one per 50 ms of reply (the app's YIELD_INTERVAL_S)
        partials_per_reply_median=statistics.median(k for *_, k, _ in records),
        ttft_ms_median=round(statistics.median(ttft), 1),
        ttft_ms_p90=round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], 1),
        tok_per_s_per_user=round(statistics.median(per_user), 1) if per_user else None,
        tok_per_s_total=round(sum(n for *_, n in records) / wall, 1),
        wall_s=round(wall, 2),
    )


def server_side(lines: list[bytes]) -> dict:
    """Medians of the app's `[reply]` log lines of a round: the engine's own rate and first-token time, without
    Gradio's delivery (a large gap to the client's figures means the time goes to the web layer)."""
    pattern = re.compile(rb"\[reply\] (\d+) tokens in ([\d.]+) s \((\d+) tok/s\), first after (\d+) ms")
    replies = [m.groups() for m in map(pattern.search, lines) if m]
    if not replies:
        return {}
    return dict(
        server_tok_per_s_median=statistics.median(int(r[2]) for r in replies),
        server_first_token_ms_median=statistics.median(int(r[3]) for r in replies),
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from hfnanochat.training.metrics import append_jsonl

    with tempfile.TemporaryDirectory(prefix="space_latency_") as tmp:
        model = args.model
        if model is None:
            # the context holds the prompt and the reply with room to spare; the app caps replies at half of it
            folder = repeating_model_folder(args.depth, args.tokenizer, Path(tmp), max(256, 4 * args.new_tokens))
            model = str(folder)
        tokenizer = AutoTokenizer.from_pretrained(model)
        if args.url:
            proc, url, app_lines = None, args.url, []
        else:
            proc, url, app_lines = start_app(model, max(args.users), args.new_tokens, args.compile)
        try:
            for users in args.users:
                seen = len(app_lines)
                result = round_of(users, url, tokenizer, args)
                result |= server_side(app_lines[seen:])
                result.update(
                    model=args.model or f"d{args.depth} nanochat init, repeating",
                    device="cuda" if torch.cuda.is_available() else "cpu",
                    compile=args.compile,
                )
                print(json.dumps(result), flush=True)
                if args.jsonl:
                    append_jsonl(args.jsonl, result)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
