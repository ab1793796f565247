"""Train nanochat's tokenizer: byte-level BPE, 65,536 tokens, on the first 2B characters of the pretraining text.

    python train/tokenizer.py                                   # FineWeb-EDU sample-10BT from the Hub (the speedrun)
    python train/tokenizer.py --data corpus.txt --vocab-size 2048 --out out/tokenizer   # local text, offline

Notable:
- `--data` is a Hub dataset id (streamed, nothing is downloaded up front) or local .txt/.jsonl/.json/.parquet
  files, a directory or a glob of them, also read through `datasets` in streaming mode. In .txt files each
  blank-line-separated paragraph is a document.
- Documents are cropped to `--doc-cap` characters and reading stops after `--max-chars` characters, like
  nanochat's tok_train (the speedrun passes --max_chars=2000000000).
- Documents come from `hfnanochat.training.data.DocumentStream`, the reader pretraining uses, with its held-out
  split (local data: rows 0, 100, 200, ...; Hub data: its validation split or its first rows): the tokenizer never
  sees pretraining's validation text, and compression (characters and bytes per token) is reported on it, so the
  number is not measured on text the merges were fitted to. nanochat reports ~4.8 chars/token on
  FineWeb-EDU with 65,536 tokens.
- The folder written by `--out` loads with `AutoTokenizer.from_pretrained` and holds `token_bytes.pt` for bpb.
"""

import os
import sys
import time

from tqdm import tqdm

from hfnanochat.cli import ArgumentParser, check_output, clear_output, positive_int
from hfnanochat.report import report_section
from hfnanochat.tokenizer import save_tokenizer, token_bytes, train_tokenizer
from hfnanochat.training.data import DEFAULT_DATA, DEFAULT_DATA_CONFIG, DocumentStream, local_files

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


def open_documents(data: str, config: str | None, text_column: str) -> tuple[DocumentStream, DocumentStream]:
    """The training and held-out documents of --data, exactly as pretraining reads them (same reader, same split);
    opened up front so a bad path, id or column, or no network, fails right away."""
    train = DocumentStream(data, split="train", name=config, text_column=text_column)
    held_out = DocumentStream(data, split="val", name=config, text_column=text_column)
    return train, held_out


def first_epoch(documents: DocumentStream):
    """One pass over a training stream (DocumentStream loops forever, counting epochs)."""
    for text in documents:
        if documents.epoch:
            return
        yield text


def main(argv=None) -> int:
    parser = ArgumentParser(description="Train nanochat's byte-level BPE tokenizer")
    parser.add_argument(
        "--data",
        default=None,
        help="Hub dataset id or local .txt/.jsonl/.json/.parquet file, directory or glob "
        f"(default: {DEFAULT_DATA} {DEFAULT_DATA_CONFIG})",
    )
    parser.add_argument(
        "--data-config",
        default=None,
        help=f"Hub dataset config name (default: {DEFAULT_DATA_CONFIG} for the default dataset, none otherwise)",
    )
    parser.add_argument("--text-column", default="text", help="column holding the document text")
    parser.add_argument(
        "--max-chars",
        type=positive_int,
        default=2_000_000_000,
        help="stop after this many training characters (the speedrun's budget)",
    )
    parser.add_argument(
        "--doc-cap", type=positive_int, default=10_000, help="crop each document to this many characters"
    )
    parser.add_argument(
        "--vocab-size", type=positive_int, default=65536, help="vocabulary size including the 9 special tokens (2**16)"
    )
    parser.add_argument("--out", default="out/tokenizer", help="output folder (AutoTokenizer-loadable)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds (default: refuse to)")
    parser.add_argument("--report-dir", default=None, help="write the report's tokenizer section into this folder")
    args = parser.parse_args(argv)
    try:  # checked before hours of training, replaced only once the new tokenizer is saved
        replace = check_output(args.out, resume=False, overwrite=args.overwrite, what="tokenizer")
    except (FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = args.data or DEFAULT_DATA
    config = args.data_config or (DEFAULT_DATA_CONFIG if args.data is None else None)

    print(f"training a {args.vocab_size:,}-token tokenizer on {data}{f' ({config})' if config else ''}")
    try:
        train_docs, held_out_docs = open_documents(data, config, args.text_column)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    n_docs = n_chars = 0

    def training_texts():
        nonlocal n_docs, n_chars
        # local text: its size in bytes (a bound on its characters), not the 2B-character budget it never reaches
        files = local_files(data)
        total = min(args.max_chars, sum(os.path.getsize(f) for f in files)) if files else args.max_chars
        with tqdm(total=total, unit="char", unit_scale=True, desc="reading", leave=False) as bar:
            for text in first_epoch(train_docs):
                text = text[: args.doc_cap]
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
        return 2
    train_seconds = time.time() - t0
    print(f"trained on {n_chars:,} characters in {n_docs:,} documents in {train_seconds:.1f}s")

    # Compression on held-out text (split_special_tokens: a literal "<|bos|>" in the text is text, as in nanochat)
    held_out, n_held_out_chars = [], 0
    for text in held_out_docs:
        if n_held_out_chars >= HELD_OUT_MAX_CHARS:
            break
        held_out.append(text[: args.doc_cap])
        n_held_out_chars += len(held_out[-1])
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

    if replace:
        clear_output(args.out)
    out = save_tokenizer(tokenizer, args.out)
    print(f"saved {len(tokenizer):,}-token tokenizer and token_bytes.pt to {out}")
    if args.report_dir:
        report_section(
            args.report_dir,
            "tokenizer",
            config={
                "data": data,
                "data_config": config,
                "max_chars": args.max_chars,
                "doc_cap": args.doc_cap,
                "compression_measured_on": label,
            },
            metrics={
                "vocab_size": len(tokenizer),
                "train_chars": n_chars,
                "train_docs": n_docs,
                "chars_per_token": n_text_chars / n_tokens,
                "bytes_per_token": n_text_bytes / n_tokens,
            },
            wall_time_s=train_seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
