"""
Pretraining data: documents from local files or the Hub, nanochat's BOS-aligned best-fit packing, bits per byte.

Notable:
- Sources: a local file, directory or glob of .txt / .jsonl / .json / .parquet files, or a Hugging Face dataset id.
  Everything is streamed through `datasets` (`load_dataset(..., streaming=True)`), so nothing is downloaded up front.
  In .txt files a document is a group of lines between blank lines (tinyshakespeare: one speech).
- Split of local data: rows 0, 100, 200, ... are validation and the rest training. No shuffling: nanochat's shards are
  pre-shuffled, and FineWeb-style dumps are already in random order.
- Split of streamed (Hub) data: its own `validation` split if it ships one, else the first HUB_VAL_DOCS rows (of its
  first file) are validation and training starts after them. Not every 100th row as for local files: a stream can only
  be read from the start, so that rule made each evaluation scan ~1.6M FineWeb-EDU rows for 16k validation documents,
  where a leading block costs only the rows the evaluation uses.
- Sharding: rank r of W of a streamed split reads whole files, r, r+W, ... (`split_dataset_by_node`), when W divides
  the file count, so no rank downloads another's data; otherwise, and for local data, rank r takes rows r, r+W, ...
  (every rank reads every file). The validation block is split the row-wise way, so it is the same for any W. Training
  streams loop forever (with an epoch counter); validation streams make one pass.
- Packing (nanochat 2026, "BOS-aligned best-fit crop"): each document is prefixed with <|bos|>; a row of T+1 tokens
  repeatedly takes the largest buffered document that still fits and, once none fits, crops the shortest one to fill
  the row exactly (its tail is dropped). Every row starts with BOS and a document starts only at a BOS; no padding,
  so every position is trained. About 35% of tokens are cropped at T=2048 (the greedy crop lost 39%).
- Tokenization runs in a background thread, 128 documents at a time; the packer takes those batches in stream order,
  so the batches never depend on timing.
- Exact resume: `state_dict()` holds the stream position (with the `datasets` iterator state, so a Hub resume re-reads
  at most the current shard) and the token ids of the buffered documents. A restored loader yields the same batches
  bit for bit; nanochat resumes only approximately, at the next parquet row group, and loses its buffer.
- The Hub is asked once per process and source (existence, files, first rows), not again for each evaluation's loader.
- `evaluate_bpb`: nanochat's bits per byte, which compares models across tokenizers.
"""

import bisect
import functools
import glob
import math
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets.distributed import split_dataset_by_node
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

# nanochat pretrains (and trains its tokenizer) on FineWeb-EDU; the 10B-token sample is more than a d20 run reads
DEFAULT_DATA, DEFAULT_DATA_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
# 1% held out: tinyshakespeare gets ~70 validation speeches, and row 0 makes even a one-row file evaluable.
VAL_EVERY = 100
# Streamed data without a validation split: its first 50,000 documents are validation, nanochat's one validation shard
# (~54k documents, 250M characters) in size. At FineWeb-EDU's ~1,000 tokens a document that is ~50M tokens, five times
# the default 10M-token evaluation, and it lies in the first file, which each evaluation reads only as far as it needs.
HUB_VAL_DOCS = 50_000
# suffix -> `datasets` builder; "text" is our own paragraph reader (the stock "text" builder yields single lines)
LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def local_files(source: str) -> list[str] | None:
    """The data files a local source names, or None when `source` is no local path (it is then a Hub dataset id)."""
    path = os.path.expanduser(source)
    if any(c in path for c in "*?["):
        entries = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        root = Path(path)
        entries = sorted(
            str(p)
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    elif os.path.isfile(path):
        entries = [path]
    elif Path(path).suffix in LOCAL_KINDS or path.startswith(("/", ".", "~")):
        raise ValueError(f"data path {source!r} does not exist")
    else:
        return None
    files = [os.path.abspath(f) for f in entries if os.path.isfile(f) and Path(f).suffix in LOCAL_KINDS]
    if not files:
        raise ValueError(
            f"{source!r} holds no readable text files: none of its {len(entries)} entries ends in "
            f"{', '.join(LOCAL_KINDS)}"
        )
    suffixes = sorted({Path(f).suffix for f in files})
    if len({LOCAL_KINDS[s] for s in suffixes}) > 1:
        raise ValueError(f"{source!r} mixes {', '.join(suffixes)} files; point the data path at one kind")
    return files


def _paragraphs(files: list[str]) -> Iterator[dict]:
    """Rows {"text": paragraph} of .txt files, a paragraph being the lines between blank (or blank-looking) lines."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines, line_number = [], 0
            try:
                for line_number, line in enumerate(f, start=1):  # noqa: B007 (read in the except)
                    if line.strip():
                        lines.append(line)
                    elif lines:
                        yield {"text": "".join(lines).rstrip("\n")}
                        lines = []
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: not UTF-8 text (after line {line_number}: {e.reason} at byte {e.start} of a read "
                    "block); convert it to UTF-8 or leave it out of --data"
                ) from None
            if lines:
                yield {"text": "".join(lines).rstrip("\n")}


def check_hub_dataset(repo_id: str) -> None:
    """One quick request before `load_dataset`: offline, `load_dataset` retries for ~25 s and then fails with chained
    tracebacks; this says in one line what is wrong and what to do instead."""
    try:
        HfApi().dataset_info(repo_id, timeout=10)
    except GatedRepoError:
        raise
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise ValueError(f"{repo_id!r} is neither a local path nor a dataset on the Hugging Face Hub ({e})") from e
    except HfHubHTTPError:
        raise
    except Exception as e:  # no HTTP answer at all: DNS failure, refused connection, timeout, HF_HUB_OFFLINE=1
        raise ValueError(
            f"could not reach the Hugging Face Hub for dataset {repo_id!r} ({type(e).__name__}: {e}). "
            "This machine seems offline: use local files instead (--data PATH; train/sft.py: --source TASK=PATH, "
            "or --preset tiny, which needs no download)"
        ) from None


@functools.cache
def _hub_dataset(repo_id: str, name: str | None) -> datasets.IterableDatasetDict:
    """The streamed splits of a Hub dataset; cached, since every evaluation opens fresh validation streams."""
    check_hub_dataset(repo_id)
    return datasets.load_dataset(repo_id, name, streaming=True)


def _split_streamed(
    splits: datasets.IterableDatasetDict, label: str, split: str, rank: int, world_size: int
) -> tuple[datasets.IterableDataset, bool]:
    """
    Rank `rank`'s part of `split` of streamed data, and whether the caller must still keep only its rows rank,
    rank+W, ... of it (true for the held-out validation block alone).
    """
    has_val = "validation" in splits
    if "train" not in splits and not (split == "val" and has_val):
        raise ValueError(f"{label} has no 'train' split (it has {', '.join(splits)})")
    # every path below wraps the (cached, shared) dataset in a new one, so each stream keeps its own position
    dataset = splits["validation" if split == "val" and has_val else "train"]
    if split == "val" and not has_val:
        # within the first file, so it never reaches rows that training reads: should that file be shorter than
        # HUB_VAL_DOCS rows, training's skip below passes over a few rows of the next file that neither split uses
        first_file = dataset.shard(num_shards=dataset.num_shards, index=0, contiguous=True)
        return first_file.take(HUB_VAL_DOCS), True
    # whole files per rank when they divide evenly; else `datasets` falls back to every W-th row, as for local data
    by_file = dataset.num_shards % world_size == 0
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if split == "train" and not has_val and (rank == 0 or not by_file):
        dataset = dataset.skip(HUB_VAL_DOCS)  # file by file, the held-out block leads rank 0's first file
    return dataset, False


# (source, name, split, text_column, rank, world_size) of Hub streams that passed DocumentStream's check
_CHECKED_HUB_STREAMS: set[tuple] = set()


class DocumentStream:
    """
    One rank's documents (non-empty texts) of one split of a source, in a fixed order. Iterating yields the texts from
    the current position: forever for split="train" (the epoch counter goes up at each wrap), once for split="val".
    `state_dict()` is the position after the last text yielded. Bad sources raise ValueError at construction.

    `source` is a local path, a Hub dataset id (`name` picks its config), or streamed data already opened, such as
    `load_dataset(..., streaming=True)` returns; the last two are split and sharded the same way (see the module notes).
    """

    def __init__(
        self,
        source: str | datasets.IterableDatasetDict | datasets.IterableDataset,
        *,
        split: str = "train",
        text_column: str = "text",
        name: str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.split, self.text_column = split, text_column
        self.rank, self.world_size = rank, world_size
        self.infinite = split == "train"
        streamed = isinstance(source, (datasets.IterableDatasetDict, datasets.IterableDataset))
        if not (streamed or isinstance(source, (str, os.PathLike))):
            raise ValueError(
                f"source must be a path, a Hub dataset id or a streamed dataset, got {type(source).__name__}"
            )
        self.source = f"streamed {type(source).__name__}" if streamed else str(source)
        files = None if streamed else local_files(self.source)
        check_key = None
        if files is None:
            if streamed and name is not None:
                raise ValueError(f"name={name!r} picks a Hub dataset config; already opened data has none")
            if isinstance(source, datasets.IterableDataset):
                source = datasets.IterableDatasetDict(train=source)  # a lone dataset is the "train" split
            elif not streamed:
                source = _hub_dataset(self.source, name)
                check_key = (self.source, name, split, text_column, rank, world_size)
            label = f"Hub dataset {self.source!r}" if check_key else self.source
            self._dataset, self._strided = _split_streamed(source, label, split, rank, world_size)
            self._holdout = False
            self._holdout_rule = (
                ""
                if "validation" in source
                else (f" (without a validation split, the first {HUB_VAL_DOCS} rows are validation)")
            )
        else:
            if name is not None:
                raise ValueError(f"name={name!r} picks a Hub dataset config; local data {self.source!r} has none")
            kind = LOCAL_KINDS[Path(files[0]).suffix]
            if kind == "text":
                if text_column != "text":
                    raise ValueError(f"text_column={text_column!r}, but .txt files have no columns")
                features = datasets.Features({"text": datasets.Value("string")})
                self._dataset = datasets.IterableDataset.from_generator(
                    _paragraphs, gen_kwargs={"files": files}, features=features
                )
            else:
                self._dataset = datasets.load_dataset(kind, data_files=files, split="train", streaming=True)
            self._holdout, self._strided = True, True
            self._holdout_rule = f" (rows 0, {VAL_EVERY}, {2 * VAL_EVERY}, ... are validation)"
        self._state = {"epoch": 0, "row": 0, "dataset": None}  # row: next row of the underlying stream to read
        if check_key not in _CHECKED_HUB_STREAMS:
            self._check()
            if check_key is not None:
                _CHECKED_HUB_STREAMS.add(check_key)

    @property
    def epoch(self) -> int:
        return self._state["epoch"]

    def _split_index(self, row: int) -> int | None:
        """Index of underlying row `row` among the rows of this split, or None if it belongs to the other."""
        if not self._holdout:
            return row
        if self.split == "val":
            return row // VAL_EVERY if row % VAL_EVERY == 0 else None
        return row - row // VAL_EVERY - 1 if row % VAL_EVERY else None

    def _mine(self, row: int) -> bool:
        """Whether underlying row `row` is of this split and falls to this rank (an empty one is still skipped)."""
        k = self._split_index(row)
        return k is not None and (not self._strided or k % self.world_size == self.rank)

    def _read(self, dataset_state: dict | None) -> Iterator[dict]:
        self._dataset.load_state_dict(dataset_state)  # None: from the first row
        return iter(self._dataset)

    def _check(self):
        """Read until this rank's first document, so that a bad source fails before training starts."""
        columns = self._dataset.column_names
        if columns is not None and self.text_column not in columns:
            raise ValueError(f"{self.source!r} has no column {self.text_column!r}; its columns: {', '.join(columns)}")
        n_rows = n_docs = 0
        for i, row in enumerate(self._read(None)):
            if i == 0 and self.text_column not in row:
                raise ValueError(f"{self.source!r} has no column {self.text_column!r}; its columns: {', '.join(row)}")
            n_rows += 1
            text = row[self.text_column]
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"column {self.text_column!r} of {self.source!r} holds {type(text).__name__}, not text"
                )
            if self._split_index(i) is None or not (text and text.strip()):
                continue
            n_docs += 1
            if self._mine(i):
                return
        # a stream split by `split_dataset_by_node` read only this rank's files (or rows)
        share = "" if self._strided or self.world_size == 1 else f" for rank {self.rank} of {self.world_size}"
        if n_rows == 0:
            rule = "" if self._holdout else self._holdout_rule  # a streamed split may have been skipped to its end
            raise ValueError(f"the {self.split!r} split of {self.source!r} has no rows{share}{rule}")
        if n_docs == 0:
            raise ValueError(
                f"the {self.split!r} split of {self.source!r} has no non-empty documents in column "
                f"{self.text_column!r}{share}: {n_rows} rows read{self._holdout_rule}"
            )
        raise ValueError(
            f"rank {self.rank} of {self.world_size} gets none of the {n_docs} documents of the "
            f"{self.split!r} split of {self.source!r}; use more data or fewer processes"
        )

    def __iter__(self) -> Iterator[str]:
        while True:
            epoch, start = self._state["epoch"], self._state["row"]
            i = start - 1
            for i, row in enumerate(self._read(self._state["dataset"]), start=start):
                text = row[self.text_column]
                if self._mine(i) and text and text.strip():
                    self._state = {"epoch": epoch, "row": i + 1, "dataset": self._dataset.state_dict()}
                    yield text
            if not self.infinite:
                self._state = {"epoch": epoch, "row": i + 1, "dataset": self._dataset.state_dict()}
                return
            self._state = {"epoch": epoch + 1, "row": 0, "dataset": None}

    def state_dict(self) -> dict:
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size, **self._state}

    def load_state_dict(self, state: dict):
        saved = (state["split"], state["rank"], state["world_size"])
        if saved != (self.split, self.rank, self.world_size):
            raise ValueError(
                f"data state of split {saved[0]!r}, rank {saved[1]} of {saved[2]} cannot resume split "
                f"{self.split!r}, rank {self.rank} of {self.world_size}: resume with as many processes"
            )
        self._state = {"epoch": state["epoch"], "row": state["row"], "dataset": state["dataset"]}


def iter_documents(
    source: str,
    *,
    split: str = "train",
    text_column: str = "text",
    name: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DocumentStream:
    """The documents of `split` that rank `rank` of `world_size` trains or evaluates on; see DocumentStream."""
    return DocumentStream(source, split=split, text_column=text_column, name=name, rank=rank, world_size=world_size)


def _tokenize_documents(documents: DocumentStream, tokenizer, batch_size: int, out: queue.Queue, stop: threading.Event):
    """Background thread: put (BOS-prefixed token arrays, stream state after them) per batch, then None at the end.
    It holds no reference to the loader, so a dropped loader is collected and its __del__ stops this thread."""

    def put(item):
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def encode(texts):
        # verbose=False: documents longer than the context are expected here (the packer crops), not an error
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.array([bos, *doc], dtype=np.int32) for doc in ids], documents.state_dict()

    bos = tokenizer.bos_token_id
    try:
        texts = []
        for text in documents:
            texts.append(text)
            if len(texts) == batch_size:
                put(encode(texts))  # the stream is paused right after texts[-1], so its state matches the batch
                texts = []
                if stop.is_set():
                    return
        if texts:
            put(encode(texts))
        put(None)
    except Exception as e:  # surfaced in the training process by the loader
        put(e)


class BOSBestFitLoader:
    """
    nanochat's BOS-aligned best-fit packing of a DocumentStream. Iterating yields (inputs, targets), int64 [B, T] on
    `device` (targets are inputs shifted by one); a single-pass (validation) stream stops when it can't fill a batch.

    The buffer is kept sorted by length, with equal lengths in arrival order, so bisection finds exactly the
    document nanochat's linear scan over its arrival-ordered list picks (the first of the largest that fit, or the
    first of the shortest).
    """

    def __init__(
        self,
        tokenizer,
        documents: DocumentStream,
        batch_size: int,
        seq_len: int,
        *,
        device: str | torch.device = "cpu",
        buffer_size: int = 1000,
        tokenizer_batch_size: int = 128,
    ):
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no bos_token_id: every document must start with BOS")
        for arg, value in (
            ("batch_size", batch_size),
            ("seq_len", seq_len),
            ("buffer_size", buffer_size),
            ("tokenizer_batch_size", tokenizer_batch_size),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        self.tokenizer, self.documents = tokenizer, documents
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        self.buffer_size, self.tokenizer_batch_size = buffer_size, tokenizer_batch_size
        self._lengths: list[int] = []  # sorted ascending
        self._docs: list[np.ndarray] = []  # parallel to _lengths
        self._documents_state = documents.state_dict()  # stream position after the newest buffered document
        self._exhausted = False
        self._worker = None

    @property
    def epoch(self) -> int:
        """Epoch of the newest buffered document (0-based)."""
        return self._documents_state["epoch"]

    def _fill(self):
        """Top the buffer up to buffer_size documents (nanochat refills before every pick), in stream order."""
        while not self._exhausted and len(self._docs) < self.buffer_size:
            if self._worker is None:
                self._queue, self._stop = queue.Queue(maxsize=8), threading.Event()
                self._worker = threading.Thread(
                    target=_tokenize_documents,
                    daemon=True,
                    name="hfnanochat-tokenize",
                    args=(self.documents, self.tokenizer, self.tokenizer_batch_size, self._queue, self._stop),
                )
                self._worker.start()
            item = self._queue.get()
            if item is None:
                self._exhausted = True
            elif isinstance(item, Exception):
                self._queue.put_nowait(item)  # the thread is gone: raise again on any later call instead of hanging
                raise item
            else:
                docs, self._documents_state = item
                for doc in docs:
                    i = bisect.bisect_right(self._lengths, len(doc))  # after equal lengths: keeps arrival order
                    self._lengths.insert(i, len(doc))
                    self._docs.insert(i, doc)

    def _pop(self, i: int) -> np.ndarray:
        del self._lengths[i]
        return self._docs.pop(i)

    def _fill_row(self, row: np.ndarray) -> bool:
        """Pack one row best-fit; False when a single-pass stream runs dry first."""
        pos, capacity = 0, len(row)
        while pos < capacity:
            self._fill()
            if not self._docs:
                return False
            remaining = capacity - pos
            i = bisect.bisect_right(self._lengths, remaining) - 1
            if i >= 0:  # the largest document that fits whole (the oldest of that length)
                doc = self._pop(bisect.bisect_left(self._lengths, self._lengths[i]))
                row[pos : pos + len(doc)] = doc
                pos += len(doc)
            else:  # none fits: crop the shortest (the oldest of that length) to fill the row, drop its tail
                row[pos:] = self._pop(0)[:remaining]
                pos = capacity
        return True

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        rows = np.empty((B, T + 1), dtype=np.int64)
        for r in range(B):
            if not self._fill_row(rows[r]):
                raise StopIteration
        rows = torch.from_numpy(rows)
        on_cuda = self.device.type == "cuda"  # also cuda:N: nanochat compared with "cuda" and lost pinning under DDP
        # inputs and targets side by side in one pinned buffer: one host-to-device copy, both halves contiguous. A
        # fresh buffer per batch is safe with non_blocking: the caching host allocator reuses it only once the copy is
        # done (nanochat rewrites one pinned buffer while the previous copy may still be in flight).
        staging = torch.empty((2, B, T), dtype=torch.long, pin_memory=on_cuda)
        staging[0] = rows[:, :-1]
        staging[1] = rows[:, 1:]
        batch = staging.to(self.device, non_blocking=on_cuda)
        return batch[0], batch[1]

    def state_dict(self) -> dict:
        """JSON-able: stream position after the newest buffered document, and the buffered documents' token ids."""
        return {"documents": self._documents_state, "buffer": [doc.tolist() for doc in self._docs]}

    def load_state_dict(self, state: dict):
        self.close()
        self.documents.load_state_dict(state["documents"])
        self._documents_state = self.documents.state_dict()
        self._docs = [np.asarray(doc, dtype=np.int32) for doc in state["buffer"]]  # saved in buffer order
        self._lengths = [len(doc) for doc in self._docs]
        self._exhausted = False

    def close(self):
        """Stop the tokenizer thread and rewind the stream to the buffer's end (what the thread read ahead is
        dropped), so that iterating again continues exactly where it was."""
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None
            self.documents.load_state_dict(self._documents_state)

    def __del__(self):
        if getattr(self, "_worker", None) is not None:
            self._stop.set()


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor) -> float:
    """
    nanochat's bits per byte of `model` over (inputs, targets) batches: the summed cross-entropy (nats, fp32, on the
    logits the model returns, soft-capped inside it) of the targets that are text, over ln 2 times their UTF-8 bytes.
    Per byte rather than per token, so models with different tokenizers compare. token_bytes[id] is the byte length of
    token id, 0 for special tokens, which drops them from both sums; targets < 0 (ignored positions) count nothing.
    Summed across ranks when torch.distributed is initialised; inf when no byte was seen.
    """
    device = next(model.parameters()).device
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    for x, y in batches:
        logits = model(input_ids=x).logits.float()
        safe_y = y.clamp(min=0)
        n_bytes = torch.where(y >= 0, token_bytes[safe_y], 0)
        loss = F.cross_entropy(logits.flatten(0, 1), safe_y.flatten(), reduction="none").view_as(y)
        total_nats += (loss * (n_bytes > 0)).sum()
        total_bytes += n_bytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    n_bytes = total_bytes.item()
    return total_nats.item() / (math.log(2) * n_bytes) if n_bytes else float("inf")
