"""Train nanochat's tokenizer: byte-level BPE, 65,536 tokens, on the first 2B characters of the pretraining text.

    python train/tokenizer.py                                   # FineWeb-EDU sample-10BT from the Hub (the speedrun)
    python train/tokenizer.py --data /work/shared/data/text/tinyshakespeare.txt --vocab-size 2048 --out /tmp/tok

Notable:
- `--data` is a Hub dataset id (streamed, nothing is downloaded up front) or local .txt/.jsonl/.json/.parquet
  files, a directory or a glob of them, also read through `datasets` in streaming mode. In .txt files each
  blank-line-separated paragraph is a document.
- Documents are cropped to `--doc-cap` characters and reading stops after `--max-chars` characters, like
  nanochat's tok_train (the speedrun passes --max_chars=2000000000).
- Every 100th document (~1%) is held out of training; compression (characters and bytes per token) is reported on
  it, so the number is not measured on text the merges were fitted to. nanochat reports ~4.8 chars/token on
  FineWeb-EDU with 65,536 tokens.
- The folder written by `--out` loads with `AutoTokenizer.from_pretrained` and holds `token_bytes.pt` for bpb.
"""

import argparse
import glob
import itertools
import os
import sys
import time
from pathlib import Path

from datasets import load_dataset
from tqdm import tqdm

from hfnanochat.tokenizer import save_tokenizer, token_bytes, train_tokenizer

DEFAULT_DATA, DEFAULT_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"  # nanochat pretrains on FineWeb-EDU
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HELD_OUT_EVERY = 100  # 1% of documents are never trained on
HELD_OUT_MAX_CHARS = 10_000_000  # plenty for a compression estimate, and it stays in memory
MIN_HELD_OUT_CHARS = 2_000  # below this (tiny corpora) the estimate is noise: use the paragraph below instead
FALLBACK_TEXT = (
    "The tokenizer turns text into a sequence of integers. It first splits the text into words, numbers and "
    "punctuation with a regular expression, then merges the most frequent pairs of bytes into new tokens, over and "
    "over, until the vocabulary is full. GPT-3 read about 300 billion tokens in 2020; nanochat's $100 model reads "
    "about 11 billion. Compression matters: more characters per token means a longer effective context and fewer "
    "steps for the same text."
)
# nanochat tok_train's round-trip string: contractions, digits, symbols and non-Latin scripts
ROUND_TRIP_TEXT = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()
Unicode: 你好世界 🌍"""


def local_files(data: str) -> list[Path] | None:
    """The local files --data names (a file, a directory or a glob), or None when it is a Hub id."""
    data = os.path.expanduser(data)
    if any(ch in data for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(data, recursive=True))]
    elif os.path.isdir(data):
        paths = sorted(p for p in Path(data).rglob("*") if p.is_file())
    elif os.path.exists(data):
        paths = [Path(data)]
    elif Path(data).suffix in BUILDERS or data.startswith((".", "/")):
        raise ValueError(f"--data {data}: no such file")
    else:
        return None
    files = [p for p in paths if p.suffix in BUILDERS and p.is_file()]
    if not files:
        raise ValueError(f"--data {data}: no {'/'.join(BUILDERS)} files there")
    return files


def open_datasets(data: str, config: str | None) -> list:
    """[(source, streaming dataset), ...] for --data; opened up front so a bad id or no network fails right away."""
    files = local_files(data)
    if files is None:
        return [(data, load_dataset(data, name=config, split="train", streaming=True))]
    # one load_dataset per run of same-type files, so the documents come in file order
    datasets = []
    for builder, group in itertools.groupby(files, key=lambda p: BUILDERS[p.suffix]):
        group = [str(p) for p in group]
        extra = {"sample_by": "paragraph"} if builder == "text" else {}  # blank-line-separated documents
        datasets.append(
            (", ".join(group), load_dataset(builder, data_files=group, split="train", streaming=True, **extra))
        )
    return datasets


def read_texts(datasets: list, text_column: str):
    """Yield the text of every document, dataset after dataset."""
    for source, ds in datasets:
        for i, row in enumerate(ds):
            if text_column not in row:
                raise ValueError(f"--text-column {text_column!r} is not a column of {source}; columns: {sorted(row)}")
            text = row[text_column]
            if not isinstance(text, str):
                raise ValueError(f"{source}, row {i}: column {text_column!r} holds {type(text).__name__}, not text")
            if text:  # the paragraph reader yields empty rows for runs of blank lines
                yield text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train nanochat's byte-level BPE tokenizer")
    parser.add_argument(
        "--data",
        default=None,
        help="Hub dataset id or local .txt/.jsonl/.json/.parquet file, directory or glob "
        f"(default: {DEFAULT_DATA} {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--data-config",
        default=None,
        help=f"Hub dataset config name (default: {DEFAULT_CONFIG} for the default dataset, none otherwise)",
    )
    parser.add_argument("--text-column", default="text", help="column holding the document text")
    parser.add_argument(
        "--max-chars",
        type=int,
        default=2_000_000_000,
        help="stop after this many training characters (the speedrun's budget)",
    )
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    parser.add_argument(
        "--vocab-size", type=int, default=65536, help="vocabulary size including the 9 special tokens (2**16)"
    )
    parser.add_argument("--out", default="out/tokenizer", help="output folder (AutoTokenizer-loadable)")
    args = parser.parse_args(argv)
    if args.max_chars < 1 or args.doc_cap < 1:
        parser.error("--max-chars and --doc-cap must be positive")
    data = args.data or DEFAULT_DATA
    config = args.data_config or (DEFAULT_CONFIG if args.data is None else None)

    print(f"training a {args.vocab_size:,}-token tokenizer on {data}{f' ({config})' if config else ''}")
    try:
        datasets = open_datasets(data, config)
    except ConnectionError as e:
        print(
            f"error: cannot reach the Hugging Face Hub for {data} ({e}).\n"
            "Offline? Point --data at local text: a .txt/.jsonl/.json/.parquet file, a directory or a glob, e.g.\n"
            "  python train/tokenizer.py --data /work/shared/data/text/tinyshakespeare.txt --vocab-size 2048",
            file=sys.stderr,
        )
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    held_out: list[str] = []
    n_held_out_chars = 0
    n_docs = n_chars = 0

    def training_texts():
        nonlocal n_held_out_chars, n_docs, n_chars
        with tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="reading") as bar:
            for i, text in enumerate(read_texts(datasets, args.text_column)):
                text = text[: args.doc_cap]
                if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
                    if n_held_out_chars < HELD_OUT_MAX_CHARS:
                        held_out.append(text)
                        n_held_out_chars += len(text)
                    continue
                n_docs += 1
                n_chars += len(text)
                bar.update(len(text))
                yield text
                if n_chars >= args.max_chars:
                    return

    t0 = time.time()
    try:
        tokenizer = train_tokenizer(training_texts(), vocab_size=args.vocab_size, doc_cap=args.doc_cap)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained on {n_chars:,} characters in {n_docs:,} documents in {time.time() - t0:.1f}s")

    # Compression on held-out text (split_special_tokens: a literal "<|bos|>" in the text is text, as in nanochat)
    if n_held_out_chars >= MIN_HELD_OUT_CHARS:
        texts, label = held_out, f"{len(held_out):,} held-out documents"
    else:
        texts, label = [FALLBACK_TEXT], "a built-in paragraph (too little held-out text)"
    n_tokens = sum(
        len(ids) for ids in tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    )
    n_text_chars = sum(len(t) for t in texts)
    n_text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(
        f"compression on {label}: {n_text_chars / n_tokens:.2f} chars/token, {n_text_bytes / n_tokens:.2f} bytes/token"
    )

    ids = tokenizer.encode(ROUND_TRIP_TEXT, add_special_tokens=False)
    n_bytes = int(token_bytes(tokenizer)[ids].sum())
    if tokenizer.decode(ids) != ROUND_TRIP_TEXT or n_bytes != len(ROUND_TRIP_TEXT.encode("utf-8")):
        print("error: round-trip check failed: decode(encode(text)) != text or token_bytes miscounts", file=sys.stderr)
        return 1
    print(f"round-trip check OK ({len(ids)} tokens)")

    out = save_tokenizer(tokenizer, args.out)
    print(f"saved {len(tokenizer):,}-token tokenizer and token_bytes.pt to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
