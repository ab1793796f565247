"""Chat with a model in the terminal (nanochat's chat_cli).

    python -m hfnanochat.chat --model out/sft                              # multi-turn, streaming
    python -m hfnanochat.chat --model out/sft -p "What is 12 times 7?"    # one reply, then exit

Notable:
- The conversation is kept as tokens, like nanochat: each user message is rendered by the tokenizer's
  `render_for_completion` (so a typed "<|assistant_end|>" stays text), the reply is appended exactly as the engine
  produced it, tool outputs included, and a reply cut by --max-new-tokens is closed with <|assistant_end|>.
- Replies stream: text is printed as soon as it is whole UTF-8 (a character split across byte-level tokens waits for
  its last byte). Calculator calls show on their own line as `[python] 12*7 -> 84` (`-> (no result)` when the
  calculator refused and nothing was forced); a reply that ends inside a call or its output (a stop token, or
  --max-new-tokens) shows what there was, marked `(unfinished)`.
- A conversation longer than the model's context minus the reply budget is cut from the left, <|bos|> kept first,
  with a notice on stderr; the full history is kept, so `clear` is the way to start over.
- Input: stdin is read as bytes and decoded strictly, so a line that is not UTF-8 gets a clear message and is
  skipped; empty messages re-prompt; messages (and -p) are stripped, as nanochat's `input().strip()`. Commands:
  `quit`/`exit`, `clear`. EOF ends the chat (status 0); Ctrl-C ends it without a traceback (status 130).
- Defaults are nanochat's chat_cli: temperature 0.6, top-k 50, 256 new tokens. On CUDA the model runs in bf16 and
  decodes through the engine's static cache + torch.compile path (the first reply waits for the compilation;
  `--no-compile` skips it); on CPU in fp32, eager.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .cli import ArgumentParser, fraction, main_entry, model_folder, non_negative_float, non_negative_int, positive_int
from .inference.engine import Engine
from .tokenizer import get_special_token_ids, render_for_completion
from .training.export import check_model_folder

DEFAULT_MAX_NEW_TOKENS = 256


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m hfnanochat.chat", description="Chat with a hfnanochat model.")
    p.add_argument("--model", required=True, help="model folder or Hub id (loaded with trust_remote_code=True)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    p.add_argument("-p", "--prompt", default=None, help="send this one message, print the reply and exit")
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.6,
        help="0 = greedy",
    )
    p.add_argument(
        "--top-k",
        type=non_negative_int,
        default=50,
        help="sample among the k most likely tokens, 0 = off",
    )
    p.add_argument(
        "--top-p",
        type=fraction,
        default=None,
        help="nucleus sampling (None: off)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help=f"reply length (None: {DEFAULT_MAX_NEW_TOKENS}, at most half the model's context)",
    )
    p.add_argument("--seed", type=int, default=42, help="sampling seed of the first reply (the n-th uses seed+n)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: cuda if available)")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="on CUDA, decode eagerly with a dynamic cache: no compile wait before the first reply, "
        "slower tokens after it",
    )
    args = p.parse_args(argv)
    if args.prompt is not None:
        if not args.prompt.strip():
            p.error("-p/--prompt is empty: give the message to send")
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as surrogate escapes
            p.error("-p/--prompt is not valid UTF-8")
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


class StreamPrinter:
    """Turns the engine's (token, mask) stream into text on `out`, showing tool calls as `[python] code -> result`."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.special = get_special_token_ids(tokenizer)
        self.text: list[int] = []  # text tokens not printed yet (an incomplete UTF-8 character)
        self.code: list[int] | None = None  # inside <|python_start|> ... <|python_end|>
        self.output: list[int] | None = None  # inside a forced <|output_start|> ... <|output_end|>
        self.awaiting_output = False  # right after <|python_end|>: is a result being forced?
        self.at_line_start = True

    def _write(self, s: str) -> None:
        if s:
            self.out.write(s)
            self.out.flush()
            self.at_line_start = s.endswith("\n")

    def _flush_text(self, final: bool = False) -> None:
        s = self.tokenizer.decode(self.text)
        if final or not s.endswith("\ufffd"):
            self._write(s)
            self.text = []

    def feed(self, token: int, mask: int) -> None:
        sp = self.special
        if self.awaiting_output:
            self.awaiting_output = False
            if token == sp["output_start"] and mask == 0:
                self.output = []
                return
            self._write(" -> (no result)\n")
        if self.output is not None:
            if token == sp["output_end"]:
                self._write(f" -> {self.tokenizer.decode(self.output)}\n")
                self.output = None
            else:
                self.output.append(token)
        elif token in (sp["assistant_end"], sp["bos"]):
            pass  # stop tokens end the reply, inside a python call too; they are not text
        elif self.code is not None:
            if token == sp["python_end"]:
                self._write(f"[python] {self.tokenizer.decode(self.code)}")
                self.code, self.awaiting_output = None, True
            else:
                self.code.append(token)
        elif token == sp["python_start"]:
            self._flush_text(final=True)
            if not self.at_line_start:
                self._write("\n")
            self.code = []
        else:
            self.text.append(token)
            self._flush_text()

    def finish(self) -> None:
        if self.code is not None:  # the reply ended inside a python call
            self._write(f"[python] {self.tokenizer.decode(self.code)} (unfinished)\n")
        elif self.output is not None:  # or inside the forced output (--max-new-tokens)
            self._write(f" -> {self.tokenizer.decode(self.output)} (unfinished)\n")
        elif self.awaiting_output:
            self._write(" -> (no result)\n")
        self._flush_text(final=True)
        if not self.at_line_start:
            self._write("\n")


class Chat:
    """The conversation as tokens, and one reply at a time through the engine."""

    def __init__(self, engine: Engine, tokenizer, args, out, err):
        self.engine, self.tokenizer, self.args, self.out, self.err = engine, tokenizer, args, out, err
        self.special = get_special_token_ids(tokenizer)
        context = getattr(engine.model.config, "max_position_embeddings", None)
        # the prompt may fill the context minus the reply's budget; 5 tokens is the smallest chat prompt
        # (<|bos|> <|user_start|> one token <|user_end|> <|assistant_start|>)
        self.budget = None if context is None else context - args.max_new_tokens
        if self.budget is not None and self.budget < 5:
            raise ValueError(
                f"--max-new-tokens {args.max_new_tokens} leaves {self.budget} of the model's {context}-token context "
                "for the conversation; ask for fewer new tokens"
            )
        self.turn = 0
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.special["bos"]]

    def reply(self, message: str) -> None:
        sp = self.special
        # as nanochat's input().strip(): a stray space or tab would be tokens the model never saw before a message
        conversation = [{"role": "user", "content": message.strip()}, {"role": "assistant", "content": ""}]
        self.tokens += render_for_completion(self.tokenizer, conversation)[1:]  # drop its <|bos|>: ours comes first
        prompt = self.tokens
        if self.budget is not None and len(prompt) > self.budget:
            prompt = [sp["bos"], *prompt[len(prompt) - self.budget + 1 :]]
            self.err.write(
                f"[notice] the conversation is {len(self.tokens)} tokens; the model sees {self.budget} with room for "
                f"a {self.args.max_new_tokens}-token reply, so the oldest {len(self.tokens) - self.budget} tokens "
                "were dropped (<|bos|> kept first)\n"
            )
            self.err.flush()
        printer = StreamPrinter(self.tokenizer, self.out)
        generated = []
        stream = self.engine.generate(
            prompt,
            max_new_tokens=self.args.max_new_tokens,
            temperature=self.args.temperature,
            top_k=self.args.top_k,
            top_p=self.args.top_p,
            seed=self.args.seed + self.turn,
        )
        for tokens, mask in stream:
            if tokens[0] is not None:
                generated.append(tokens[0])
                printer.feed(tokens[0], mask[0])
        printer.finish()
        if generated and generated[-1] == sp["bos"]:
            generated.pop()  # a <|bos|> stop would start a new document: close the turn properly instead
        if not generated or generated[-1] != sp["assistant_end"]:
            generated.append(sp["assistant_end"])
        self.tokens += generated
        self.turn += 1


def read_line(stream) -> bytes | None:
    line = stream.readline()
    return None if line == b"" else line.rstrip(b"\r\n")


def interactive(chat: Chat, stdin, out, err) -> int:
    out.write("Chat with the model. Commands: 'quit' or 'exit' to leave, 'clear' to start over (Ctrl-D also leaves)\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        raw = read_line(stdin)
        if raw is None:  # EOF
            out.write("\n")
            return 0
        try:
            message = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            err.write(
                f"[error] that line is not valid UTF-8 ({e.reason}: {raw[e.start : e.end]!r} at byte {e.start}); "
                "please type it again\n"
            )
            err.flush()
            continue
        command = message.strip().lower()
        if not command:
            err.write("[error] empty message: type something ('quit' leaves)\n")
            err.flush()
            continue
        if command in ("quit", "exit"):
            return 0
        if command == "clear":
            chat.clear()
            out.write("(conversation cleared)\n")
            continue
        out.write("\nAssistant: ")
        out.flush()
        chat.reply(message)


def main(argv=None) -> int:
    args = parse_args(argv)
    # a terminal that cannot show a character the model wrote gets "?" instead of a crash
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
        model_name = model_folder("--model", args.model)
        tokenizer_name = model_folder("--tokenizer", args.tokenizer) if args.tokenizer else model_name
        if Path(tokenizer_name).is_dir() and not (Path(tokenizer_name) / "tokenizer.json").is_file():
            flag = "--tokenizer" if args.tokenizer else "--model"
            raise FileNotFoundError(f"{flag} {tokenizer_name}: no tokenizer.json there (pass --tokenizer FOLDER)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load a tokenizer from {tokenizer_name!r}: {e}") from e
        check_model_folder(model_name)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_name, trust_remote_code=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load a model from {model_name!r}: {e}") from e
        model = model.to(args.device).eval()
        context = getattr(model.config, "max_position_embeddings", None)
        if args.max_new_tokens is None:
            args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
            if context is not None and context // 2 < DEFAULT_MAX_NEW_TOKENS:
                args.max_new_tokens = context // 2
                sys.stderr.write(
                    f"[notice] replies stop at {args.max_new_tokens} tokens, half of this model's {context}-token "
                    "context (--max-new-tokens sets it)\n"
                )
        engine = Engine(model, tokenizer, compile=False if args.no_compile else None)
        chat = Chat(engine, tokenizer, args, sys.stdout, sys.stderr)
        if args.prompt is not None:
            chat.reply(args.prompt)
            return 0
        return interactive(chat, sys.stdin.buffer, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 130


def cli() -> None:
    """The `hfnanochat-chat` console script."""
    main_entry(main)


if __name__ == "__main__":
    cli()
