"""hfnanochat's Gradio Space: chat with a nanochat model, the calculator tool in the loop, replies streamed.

    HFNANOCHAT_MODEL=me/hfnanochat-d20 python spaces_app/app.py        # a Hub id or a local folder

Settings (environment variables; a public demo's limits):
- HFNANOCHAT_MODEL: the model, a Hub id or a local path (default: the first of README.md's `models:`).
- HFNANOCHAT_MAX_INPUT_TOKENS (1024): longest message accepted; a longer one is answered with a request to shorten it.
- HFNANOCHAT_MAX_NEW_TOKENS (512): upper bound of the max-new-tokens slider.
- HFNANOCHAT_CONCURRENCY (4): replies generated at once; the queue holds the others (HFNANOCHAT_QUEUE, 64, at most).
- HFNANOCHAT_TIMEOUT (60): seconds a reply may take; it is cut there, with a note.
- HFNANOCHAT_COMPILE (0): on a GPU, decode through torch.compile + CUDA graphs. Compilation is not thread-safe and
  torch keeps CUDA graphs per thread, so with it on, one engine thread generates the replies one at a time (fast per
  user, no overlap); off, HFNANOCHAT_CONCURRENCY engine threads overlap them, eager.
- HOST / PORT (127.0.0.1 / 7860; on a Space, 0.0.0.0).

Notable:
- The conversation is sent by the browser each turn (Gradio's `ChatInterface` keeps no server state), so the
  prompt is rebuilt from the displayed history: a calculator line shown as `[python] 12*7 -> 84` becomes the python
  call and its output again, exactly the tokens the model wrote and read.
- A conversation longer than the context minus the reply budget is cut from the left, <|bos|> kept first (as
  `python -m hfnanochat.chat` does).
- The only code that runs is nanochat's calculator (an arithmetic whitelist); nothing else the model writes runs.
- Errors reach the user as one line in the chat, never a traceback.
"""

import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
try:
    import hfnanochat  # noqa: F401  (pip-installed, or shipped beside app.py on a Space)
except ImportError:  # `python spaces_app/app.py` from a checkout
    sys.path.insert(0, str(HERE.parent))

from hfnanochat.chat import StreamPrinter  # noqa: E402
from hfnanochat.inference.engine import Engine  # noqa: E402
from hfnanochat.tokenizer import get_special_token_ids, render_for_completion  # noqa: E402


def _env_int(name: str, default: int, low: int = 1) -> int:
    value = os.environ.get(name, str(default))
    try:
        number = int(value)
    except ValueError:
        raise SystemExit(f"error: {name} must be an integer, got {value!r}") from None
    if number < low:
        raise SystemExit(f"error: {name} must be >= {low}, got {number}")
    return number


def default_model() -> str | None:
    from huggingface_hub import SpaceCard

    readme = HERE / "README.md"
    models = SpaceCard.load(readme).data.models if readme.is_file() else None
    return models[0] if models else None


MAX_INPUT_TOKENS = _env_int("HFNANOCHAT_MAX_INPUT_TOKENS", 1024)
MAX_NEW_TOKENS = _env_int("HFNANOCHAT_MAX_NEW_TOKENS", 512)
CONCURRENCY = _env_int("HFNANOCHAT_CONCURRENCY", 4)
QUEUE_SIZE = _env_int("HFNANOCHAT_QUEUE", 64)
TIMEOUT_S = _env_int("HFNANOCHAT_TIMEOUT", 60)
COMPILE = os.environ.get("HFNANOCHAT_COMPILE", "0") == "1"
YIELD_INTERVAL_S = 0.05  # the shown reply grows at most 20 times a second: smooth to read, cheap for Gradio
MAX_MESSAGE_CHARS = 16 * MAX_INPUT_TOKENS  # a bound before tokenizing: nobody's message is 16 characters a token
CALL = re.compile(r"^`*\[python\] (?P<code>.*?)(?: -> (?P<result>.*?))?(?P<cut> \(unfinished\))?`*$")


class Demo:
    """The model, its engine and the reply function the chat calls."""

    def __init__(self, model_id: str):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model_id = model_id
        self.model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype=dtype)
        self.model = self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.special = get_special_token_ids(self.tokenizer)
        compile = COMPILE and self.device.type == "cuda"
        self.engine = Engine(self.model, self.tokenizer, compile=compile)
        # The engine runs in threads of its own, kept for the app's life: torch's CUDA graphs belong to the thread
        # that recorded them (a new thread per reply re-recorded them on every reply), and dynamo and graph
        # recording are not thread-safe, so compiled, one thread does all the decoding, the warm-up included
        self.engine_threads = ThreadPoolExecutor(max_workers=1 if compile else CONCURRENCY, thread_name_prefix="engine")
        self.context = self.model.config.max_position_embeddings
        # the reply budget may take at most half the context: the other half is the conversation's
        self.max_new_tokens = max(1, min(MAX_NEW_TOKENS, self.context // 2))
        self.default_new_tokens = min(256, self.max_new_tokens)
        self.turns = 0
        if compile:
            # compile (about a minute at d20) before the first visitor comes, not during their first reply; a reply
            # at the default budget has the cache size of a short first turn, so that turn replays this graph
            t0 = time.monotonic()
            print("compiling the decode step ...", flush=True)
            warm_up = self.engine.generate_batch
            self.engine_threads.submit(warm_up, [self.special["bos"]], max_new_tokens=self.default_new_tokens).result()
            print(f"compiled in {time.monotonic() - t0:.0f} s", flush=True)

    def info(self) -> str:
        c = self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        return (
            f"Model: `{self.model_id}` · {params / 1e6:.1f}M parameters · depth {c.num_hidden_layers} · width "
            f"{c.hidden_size} · context {self.context} · {self.device.type} {str(self.model.dtype).split('.')[-1]}"
            f" · calculator tool on"
        )

    def conversation_tokens(self, message: str, history: list[dict]) -> list[int]:
        """<|bos|>, the history as nanochat's chat format, the new message and <|assistant_start|>."""
        messages = []
        for m in history:
            content = _text(m.get("content"))
            if m.get("role") == "user":
                messages.append({"role": "user", "content": content})
            elif m.get("role") == "assistant" and messages:
                if messages[-1]["role"] == "assistant":  # one reply shown as several bubbles
                    messages[-1]["content"] += parts_from_display(content)
                else:
                    messages.append({"role": "assistant", "content": parts_from_display(content)})
        messages = [m for i, m in enumerate(messages) if m["role"] == "assistant" or _answered(messages, i)]
        messages += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        return render_for_completion(self.tokenizer, messages)

    def respond(self, message: str, history: list[dict], temperature: float, top_k: float, max_new_tokens: float):
        """Stream the reply as the cumulative text (what ChatInterface shows)."""
        try:
            yield from self._respond(message, history, temperature, top_k, max_new_tokens)
        except Exception as e:  # the user sees one line, the log gets the details
            print(f"[error] {type(e).__name__}: {e}", file=sys.stderr)
            yield f"⚠️ Sorry, something went wrong while generating the reply ({type(e).__name__}). Please try again."

    def _respond(self, message, history, temperature, top_k, max_new_tokens):
        message = (message or "").strip()
        if not message:
            yield "Please type a message."
            return
        max_new = int(min(max(1, max_new_tokens), self.max_new_tokens))
        limit = min(MAX_INPUT_TOKENS, self.context - max_new - 5)
        size = f"{len(message):,} characters" if len(message) > MAX_MESSAGE_CHARS else None
        if size is None:
            n = len(self.tokenizer.encode(message, add_special_tokens=False))
            size = f"{n:,} tokens" if n > limit else None
        if size is not None:
            yield f"Your message is {size} long; this demo takes messages of up to {limit:,} tokens. Please shorten it."
            return
        tokens = self.conversation_tokens(message, history)
        budget = self.context - max_new
        if len(tokens) > budget:  # the oldest turns go, <|bos|> stays first
            tokens = [self.special["bos"], *tokens[len(tokens) - budget + 1 :]]
        self.turns += 1
        reply = _Reply()
        settings = dict(
            max_new_tokens=max_new,
            temperature=float(min(max(temperature, 0.0), 2.0)),
            top_k=int(min(max(top_k, 0), 200)),
            seed=self.turns,
        )
        # The engine runs in an engine thread and this generator shows the reply so far every YIELD_INTERVAL_S: each
        # yield costs Gradio a thread hop, a postprocess of the whole chat and a message, milliseconds that a GPU
        # decode step (under one) must not wait for, so tokens are handed over in small batches, not one by one
        self.engine_threads.submit(self._generate, tokens, settings, reply)
        shown = ""
        try:
            while True:
                text, finished = reply.wait_for_more(len(shown), YIELD_INTERVAL_S)
                if finished:
                    break
                shown = text
                yield display(shown)
        finally:
            reply.cancel()  # the user left or the reply is over: the engine stops at its next step
        if reply.error is not None:
            raise reply.error
        text = display(reply.text).rstrip("\n")
        if reply.cut:
            text += f"\n\n*(stopped: a reply may take at most {TIMEOUT_S} s)*"
        yield text or "*(the model gave an empty reply)*"

    def _generate(self, tokens: list[int], settings: dict, reply: "_Reply") -> None:
        """The engine's loop, in an engine thread: tokens to text on `reply` until the reply stops, is cut by the time
        limit, or its user leaves."""
        try:
            if reply.cancelled:  # left while waiting for an engine thread
                return
            printer = StreamPrinter(self.tokenizer, reply)
            stream = self.engine.generate(tokens, **settings)
            start, first, generated = time.monotonic(), None, 0
            try:
                for step, mask in stream:
                    if step[0] is not None:
                        printer.feed(step[0], mask[0])
                        generated += 1
                        first = first or time.monotonic()
                    if reply.cancelled:
                        return
                    if time.monotonic() - start > TIMEOUT_S:
                        reply.cut = True
                        break
            finally:
                stream.close()  # the engine frees its cache
            printer.finish()
            # the server's side of a reply's speed (what the user sees adds Gradio's delivery to it)
            seconds = time.monotonic() - start
            print(
                f"[reply] {generated} tokens in {seconds:.2f} s ({generated / max(seconds, 1e-9):.0f} tok/s), "
                f"first after {1000 * ((first or start) - start):.0f} ms, prompt {len(tokens)} tokens",
                flush=True,
            )
        except Exception as e:  # shown to the user by respond
            reply.error = e
        finally:
            reply.finish()


class _Reply:
    """The reply so far, written by the engine's thread (as StreamPrinter's file) and read by the chat's generator."""

    def __init__(self):
        self.text = ""
        self.cut, self.cancelled, self.finished, self.error = False, False, False, None
        self._changed = threading.Condition()

    def write(self, s: str) -> None:
        with self._changed:
            self.text += s
            self._changed.notify_all()

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        with self._changed:
            self.finished = True
            self._changed.notify_all()

    def cancel(self) -> None:
        self.cancelled = True

    def wait_for_more(self, seen: int, interval: float) -> tuple[str, bool]:
        """(text, finished): waits until the text grew past `seen` characters or the reply finished; new text is
        held back until `interval` has passed since the wait began, so that one yield carries several tokens."""
        start = time.monotonic()
        with self._changed:
            self._changed.wait_for(lambda: self.finished or len(self.text) > seen)
            if not self.finished:
                self._changed.wait_for(lambda: self.finished, timeout=max(0.0, start + interval - time.monotonic()))
            return self.text, self.finished


def _text(content) -> str:
    """A history message's text: Gradio sends a string or a list of {"type": "text", "text": ...} blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return ""


def _answered(messages: list[dict], i: int) -> bool:
    """A user message followed by a reply (a message whose reply failed is left out of the prompt)."""
    return i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"


def display(text: str) -> str:
    """Calculator lines as inline code (so `2*3*4` is not read as emphasis); the rest stays Markdown."""
    lines = []
    for line in text.split("\n"):
        if line.startswith("[python] "):
            fence = "``" if "`" in line else "`"
            line = f"{fence}{line}{fence}"
        lines.append(line)
    return "\n".join(lines)


def parts_from_display(text: str) -> list[dict]:
    """The shown reply back to nanochat's assistant parts: text, python call, python output."""
    parts = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = CALL.match(line)
        if m is None:
            parts.append({"type": "text", "text": line + ("\n" if i + 1 < len(lines) else "")})
            continue
        if parts and parts[-1]["type"] == "text" and parts[-1]["text"].endswith("\n"):
            parts[-1]["text"] = parts[-1]["text"][:-1]  # the newline the display put before the call
        parts.append({"type": "python", "text": m["code"]})
        if m["result"] is not None and m["result"] != "(no result)":
            parts.append({"type": "python_output", "text": m["result"]})
    return [p for p in parts if p["text"] or p["type"] != "text"]


def build(demo: Demo) -> gr.ChatInterface:
    return gr.ChatInterface(
        demo.respond,
        additional_inputs=[
            gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="temperature (0 = greedy)"),
            gr.Slider(0, 200, value=50, step=1, label="top-k (0 = off)"),
            gr.Slider(1, demo.max_new_tokens, value=demo.default_new_tokens, step=1, label="max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        title="hfnanochat",
        description=demo.info(),
        api_name="chat",
        concurrency_limit=CONCURRENCY,
        save_history=False,
        examples=None,
        fill_height=True,
    )


def main() -> None:
    model_id = os.environ.get("HFNANOCHAT_MODEL") or default_model()
    if not model_id:
        raise SystemExit("error: set HFNANOCHAT_MODEL to a Hub model id or a local model folder")
    app = build(Demo(model_id))
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    app.launch(
        server_name=os.environ.get("HOST") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"),
        server_port=_env_int("PORT", 7860),
        show_error=False,
    )


if __name__ == "__main__":
    main()
