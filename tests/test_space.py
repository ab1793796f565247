"""The Gradio Space (`spaces_app/app.py`) on loopback with a tiny scripted model: driven by gradio_client (multi-turn,
the calculator, an over-long message), by a real headless Chromium, and by 32 clients at once."""

import importlib.util
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
from test_engine import scripted_model, syllable_text, tool_script

from hfnanochat.tokenizer import render_for_completion, train_tokenizer
from hfnanochat.training.export import save_final

pytest.importorskip("gradio", reason="the Space needs gradio (the dev extra installs it)")
from gradio_client import Client  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "spaces_app" / "app.py"
REPLY = "`[python] 12*7 -> 84`\n done"  # the scripted model's answer to anything, as the chat shows it
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A final folder whose model answers every message with the python call 12*7 and, after its output, " done"."""
    tokenizer = train_tokenizer(syllable_text(), vocab_size=512)
    out = tmp_path_factory.mktemp("space") / "sft" / "final"
    save_final(scripted_model(tokenizer, *tool_script(tokenizer, "12*7")), tokenizer, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_app():
    spec = importlib.util.spec_from_file_location("hfnanochat_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def in_process(model_dir):
    """The app launched in this process, its prompts recorded (the real conversation_tokens runs)."""
    app = load_app()
    demo = app.Demo(str(model_dir))
    prompts = []
    real = demo.conversation_tokens
    demo.conversation_tokens = lambda message, history: prompts.append(real(message, history)) or prompts[-1]
    blocks = app.build(demo)
    blocks.queue(default_concurrency_limit=2)
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield app, demo, url, prompts
    blocks.close()


def slowed(generate, seconds: float, steps: list):
    """The engine's generate taking `seconds` more per step (a bigger model on a CPU), each step recorded."""

    def slow_generate(*args, **kwargs):
        for step in generate(*args, **kwargs):
            time.sleep(seconds)
            steps.append(step)
            yield step

    return slow_generate


def test_client_multi_turn_with_the_calculator_and_streaming(in_process):
    app, demo, url, prompts = in_process
    client = Client(url, verbose=False)
    assert "/chat" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert client.predict("what is 12 times 7", 0.0, 50, 20, api_name="/chat") == REPLY
    # a model as slow as a big one on a CPU (30 ms a token): the reply reaches the client in growing pieces of a
    # few tokens each, one per app.YIELD_INTERVAL_S (50 ms), not one message per token
    real_generate, steps = demo.engine.generate, []
    demo.engine.generate = slowed(real_generate, 0.03, steps)
    try:
        job = client.submit("and once more?", 0.0, 50, 20, api_name="/chat")
        assert job.result(timeout=120) == REPLY
    finally:
        demo.engine.generate = real_generate
    partials = [p for p in job.outputs() if isinstance(p, str)]
    plain = [p.replace("`", "") for p in partials]  # a call line is wrapped as code once it is whole
    assert len(set(plain)) > 2 and all(REPLY.replace("`", "").startswith(p) for p in plain)  # streamed, growing
    assert len(partials) < len(steps), (len(partials), len(steps))  # several tokens per message

    # the second turn's prompt is exactly the tokens the CLI chat keeps: the shown calculator line went back to the
    # python call and its output, and the first exchange is in it
    from hfnanochat.chat import Chat

    args = Namespace(max_new_tokens=20, temperature=0.0, top_k=50, top_p=None, seed=0)
    cli = Chat(demo.engine, demo.tokenizer, args, io.StringIO(), io.StringIO())
    cli.reply("what is 12 times 7")
    second = [{"role": "user", "content": "and once more?"}, {"role": "assistant", "content": ""}]
    assert prompts[-1] == cli.tokens + render_for_completion(demo.tokenizer, second)[1:]

    client.reset_session()
    long = client.predict(" ".join(syllable_text(n_docs=3)), 0.0, 50, 20, api_name="/chat")
    assert re.fullmatch(r"Your message is [\d,]+ tokens long; .* up to 103 tokens\. Please shorten it\.", long)
    assert client.predict("what is 12 times 7", 0.0, 50, 20, api_name="/chat") == REPLY  # still serving


def test_errors_are_a_message_not_a_traceback(in_process, monkeypatch):
    app, demo, _, _ = in_process
    monkeypatch.setattr(demo, "engine", None)  # the next generation fails inside
    replies = list(demo.respond("hello", [], 0.0, 50, 20))
    assert replies == ["⚠️ Sorry, something went wrong while generating the reply (AttributeError). Please try again."]
    assert list(demo.respond("   ", [], 0.0, 50, 20)) == ["Please type a message."]


def test_a_user_who_leaves_stops_the_generation(in_process, monkeypatch):
    """The engine runs in a thread of its own; when the chat's generator is closed (the browser went away), that
    thread stops at its next step instead of generating the rest of the reply for nobody."""
    app, demo, _, _ = in_process
    steps = []
    monkeypatch.setattr(demo.engine, "generate", slowed(demo.engine.generate, 0.05, steps))
    replies = demo.respond("what is 12 times 7", [], 0.0, 50, 20)
    assert next(replies)  # the first piece of the reply
    replies.close()
    time.sleep(0.2)
    stopped_at = len(steps)
    time.sleep(0.3)
    assert len(steps) == stopped_at < 12  # the whole reply is 12 steps; none was generated after leaving


def test_replies_reuse_the_engine_threads(in_process, monkeypatch):
    """The engine threads live as long as the app: torch keeps CUDA graphs per thread, so a thread per reply would
    record the compiled decode step's graphs again on every reply."""
    app, demo, _, _ = in_process
    threads = []  # the thread objects themselves: held here, none can be freed and its identity reused
    real_generate = demo.engine.generate

    def recording_generate(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(demo.engine, "generate", recording_generate)
    for turn in range(3 * app.CONCURRENCY):
        assert list(demo.respond(f"what is 12 times {turn}", [], 0.0, 50, 20))[-1] == REPLY
    assert len(threads) == 3 * app.CONCURRENCY
    assert len(set(threads)) <= app.CONCURRENCY and all(t.name.startswith("engine") for t in threads)


def test_display_round_trips_to_the_assistant_parts():
    app = load_app()
    shown = app.display("sure\n[python] 2*3*4 -> 24\n that is 24\n[python] `x` -> (no result)\nok")
    assert shown == "sure\n`[python] 2*3*4 -> 24`\n that is 24\n``[python] `x` -> (no result)``\nok"
    assert app.parts_from_display(shown) == [
        {"type": "text", "text": "sure"},
        {"type": "python", "text": "2*3*4"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": " that is 24"},
        {"type": "python", "text": "`x`"},
        {"type": "text", "text": "ok"},
    ]


# ---------------------------------------------------------------------------------------------------------------------
# `python spaces_app/app.py` as a user starts it


@pytest.fixture(scope="module")
def served(model_dir):
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HFNANOCHAT_MODEL=str(model_dir),
        PORT=str(port),
        HFNANOCHAT_CONCURRENCY="4",
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    proc = subprocess.Popen([sys.executable, str(APP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True).start()
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 240
    while not any(b"Running on local URL" in line for line in lines):
        assert proc.poll() is None and time.time() < deadline, b"".join(lines).decode()
        time.sleep(0.5)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def memory_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def test_32_concurrent_clients_all_get_complete_answers(served):
    url, proc = served
    rss_before = memory_kib(proc.pid, "VmRSS")
    results, errors = [None] * 32, []

    def one(i):
        try:
            # a loaded CI machine serves 32 clients' handshakes slowly: httpx's 5 s default would fail them
            client = Client(url, verbose=False, httpx_kwargs={"timeout": 300})
            results[i] = client.predict(f"user {i}: what is 12 times 7", 0.6, 50, 20, api_name="/chat")
        except Exception as e:  # reported below with the others
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.time() - start
    peak = memory_kib(proc.pid, "VmHWM")
    print(f"32 clients: {elapsed:.1f} s, server RSS {rss_before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB")
    assert not errors, f"{len(errors)} clients failed: {errors[:3]}"
    assert results == [REPLY] * 32
    assert peak - rss_before < 512 * 1024  # bounded: the queue runs 4 at a time, nothing accumulates per client


@pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_real_browser_sends_a_message_and_sees_the_streamed_reply(served, tmp_path):
    pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (the dev extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    options = Options()
    options.binary_location = shutil.which("chromium")
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900")
    for flag in flags:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120, poll_frequency=0.05)
        box = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "textarea"))[0]
        assert "Model:" in driver.find_element(By.TAG_NAME, "body").text  # the model-info line
        box.send_keys("what is 12 times 7")
        box.send_keys(Keys.ENTER)

        def reply(d):
            bots = d.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
            return bool(bots) and "done" in bots[-1].text and bots[-1].text

        text = wait.until(reply)
        assert "[python] 12*7 -> 84" in text and text.rstrip().endswith("done")
        assert "what is 12 times 7" in driver.find_element(By.TAG_NAME, "body").text
        shot = tmp_path / "space.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_overlapping_generations_share_the_fast_decode_swap(model_dir):
    """A Space's threads start and end generations in any order: the model's classes are swapped while any runs and
    restored when the last one ends (each generation swapping on its own left the fast classes in place when the
    first one to start was also the first to end)."""
    from test_engine import chat_prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfnanochat.inference.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(model, tokenizer)
    plain = {m: type(m) for m in model.modules()}
    prompt = chat_prompt(tokenizer, "what is 12 times 7")
    alone = [t[0] for t, _ in engine.generate(prompt, max_new_tokens=12, temperature=0.0)]
    first, second = (engine.generate(prompt, max_new_tokens=12, temperature=0.0) for _ in range(2))
    a, b = [next(first)[0][0]], [next(second)[0][0]]
    assert any(type(m) is not cls for m, cls in plain.items())  # swapped while they run
    a += [t[0] for t, _ in first]  # the first to start ends first
    assert any(type(m) is not cls for m, cls in plain.items())  # the second still runs fast
    b += [t[0] for t, _ in second]
    assert a == b == alone
    assert all(type(m) is cls for m, cls in plain.items())  # the last to end restored the model
