"""Tests for hfnanochat.training.data: sources, splits, sharding, best-fit packing, exact resume, bits per byte."""

import json
import math
import random
from itertools import islice
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import hfnanochat.training.data
from hfnanochat.training.data import VAL_EVERY, BOSBestFitLoader, DocumentStream, evaluate_bpb, iter_documents

WORDS = (
    "the king queen speak hear me now my lord good night sweet prince what is this a dagger I see before "
    "to be or not that question all world stage men women players exit entrance"
).split()


def make_texts(n, seed=0, max_words=40):
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for i in range(n)]


def write_jsonl(path, texts, **extra_columns):
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, **{k: v[i] for k, v in extra_columns.items()}}) + "\n")
    return str(path)


def train_and_val(texts):
    """The split rule, written out: rows 0, 100, ... are validation."""
    return ([t for i, t in enumerate(texts) if i % VAL_EVERY], [t for i, t in enumerate(texts) if i % VAL_EVERY == 0])


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real byte-level BPE (300 tokens) trained on a few KB, with <|bos|> as special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|bos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(make_texts(200, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>")


def word_tokenizer(words):
    """One token per whitespace-separated word, so a document's length is its word count + 1 (BOS)."""
    vocab = {"<|bos|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>")


def rows_of(inputs, targets):
    """The packed rows of T+1 tokens back from a batch."""
    return torch.cat([inputs[:, :1], targets], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# best-fit packing


def test_best_fit_hand_example(tmp_path):
    # lengths with BOS: a5 b3 c7 d2 e4 f12 g9 h4; rows hold T+1 = 9 tokens
    lengths = dict(a=5, b=3, c=7, d=2, e=4, f=12, g=9, h=4)
    docs = [" ".join([w] * (n - 1)) for w, n in lengths.items()]
    path = write_jsonl(tmp_path / "d.jsonl", ["held out"] + docs)  # row 0 is validation
    tok = word_tokenizer(list(lengths))
    # one tokenizer batch holds all 8 documents, and buffer_size=1 refills only once the buffer is empty
    loader = BOSBestFitLoader(tok, iter_documents(path), batch_size=2, seq_len=8, buffer_size=1, tokenizer_batch_size=8)

    def show(row):
        return "".join("^" if t == tok.bos_token_id else tok.convert_ids_to_tokens(t) for t in row.tolist())

    got = [show(row) for _ in range(3) for row in rows_of(*next(loader))]
    assert got == [
        "^gggggggg",  # the largest that fits: g9 fills the row
        "^cccccc^d",  # c7, then the 2 left take d2
        "^aaaa^eee",  # a5, then e4 wins the tie with h4 by arriving first
        "^hhh^bb^f",  # h4, b3, then nothing fits the last 2: f, the shortest left, is cropped
        "^gggggggg",  # the buffer ran empty: the next epoch's 8 documents repeat the layout
        "^cccccc^d",
    ]
    assert loader.epoch == 1


def naive_best_fit(docs, n_rows, capacity, buffer_size, batch):
    """The algorithm of nanochat's dataloader, transcribed literally: linear scans over an arrival-ordered list."""
    docs, buf, rows = iter(docs), [], []
    for _ in range(n_rows):
        row = []
        while len(row) < capacity:
            while len(buf) < buffer_size:
                buf.extend(islice(docs, batch))
            remaining = capacity - len(row)
            best = -1
            for i, doc in enumerate(buf):
                if len(doc) <= remaining and (best < 0 or len(doc) > len(buf[best])):
                    best = i
            if best >= 0:
                row += buf.pop(best)
            else:
                shortest = min(range(len(buf)), key=lambda i: len(buf[i]))
                row += buf.pop(shortest)[:remaining]
        rows.append(row)
    return rows


def test_best_fit_matches_nanochat_algorithm(tmp_path):
    texts = make_texts(250, seed=2, max_words=30)  # lengths 3..32 with BOS: many ties, some longer than a row
    tok = word_tokenizer([str(i) for i in range(250)] + list(WORDS))
    loader = BOSBestFitLoader(
        tok,
        iter_documents(write_jsonl(tmp_path / "d.jsonl", texts)),
        batch_size=3,
        seq_len=20,
        buffer_size=16,
        tokenizer_batch_size=5,
    )
    got = [row for _ in range(100) for row in rows_of(*next(loader)).tolist()]
    train, _ = train_and_val(texts)
    epochs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in train] * 3
    assert loader.epoch >= 1  # 300 rows of 21 tokens span more than one epoch
    assert got == naive_best_fit(epochs, n_rows=300, capacity=21, buffer_size=16, batch=5)


def test_rows_are_bos_aligned(tmp_path, bpe_tokenizer):
    texts = make_texts(300, seed=3, max_words=60)
    tok = bpe_tokenizer
    bos = tok.bos_token_id
    loader = BOSBestFitLoader(
        tok,
        iter_documents(write_jsonl(tmp_path / "d.jsonl", texts)),
        batch_size=4,
        seq_len=64,
        buffer_size=50,
        tokenizer_batch_size=16,
    )
    docs = {tuple([bos] + ids) for ids in tok(train_and_val(texts)[0], add_special_tokens=False)["input_ids"]}
    for _ in range(20):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, 64) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in rows_of(inputs, targets).tolist():
            assert row[0] == bos
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            # every piece between BOS tokens is a whole document, except a cropped last one (a document's prefix)
            assert all(piece in docs for piece in pieces[:-1])
            assert pieces[-1] in docs or any(doc[: len(pieces[-1])] == pieces[-1] for doc in docs)


# ----------------------------------------------------------------------------------------------------------------------
# sources, splits, sharding


def test_rank_sharding_covers_all_documents_once(tmp_path):
    texts = make_texts(250)
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    train, _ = train_and_val(texts)  # 247 documents: rank 0 gets 124, rank 1 gets 123
    streams = [iter_documents(path, rank=r, world_size=2) for r in range(2)]
    seen = [list(islice(iter(s), n)) for s, n in zip(streams, (124, 123))]
    assert seen[0] == train[0::2] and seen[1] == train[1::2]
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(train)
    # training streams loop: the next document starts epoch 1 from the beginning of the rank's share
    assert streams[0].epoch == 0 and next(iter(streams[0])) == train[0] and streams[0].epoch == 1


def write_source(tmp_path, kind, texts):
    if kind == "txt":  # one paragraph per document; whitespace-only lines separate paragraphs too
        body = "\n\n".join(t.replace(" ", "\n", 1) for t in texts)
        (tmp_path / "a.txt").write_text(body.replace("\n\n", "\n  \n", 3) + "\n")
        return str(tmp_path / "a.txt"), [t.replace(" ", "\n", 1) for t in texts]
    if kind == "jsonl":
        return write_jsonl(tmp_path / "a.jsonl", texts, id=list(range(len(texts)))), texts
    if kind == "parquet":
        pq.write_table(
            pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "a.parquet", row_group_size=64
        )
        return str(tmp_path / "a.parquet"), texts
    # a directory of two jsonl files, read in sorted order; hidden files and other suffixes are skipped
    write_jsonl(tmp_path / "part1.jsonl", texts[len(texts) // 2 :])
    write_jsonl(tmp_path / "part0.jsonl", texts[: len(texts) // 2])
    (tmp_path / "notes.md").write_text("not data")
    write_jsonl(tmp_path / ".hidden.jsonl", ["hidden"])
    return str(tmp_path if kind == "dir" else tmp_path / "part*.jsonl"), texts


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "dir", "glob"])
def test_local_sources_and_split(tmp_path, kind):
    path, docs = write_source(tmp_path, kind, make_texts(230))
    train, val = train_and_val(docs)
    assert list(islice(iter(iter_documents(path, split="train")), len(train))) == train
    assert list(iter_documents(path, split="val")) == val  # one pass
    assert set(train).isdisjoint(val)


def test_empty_documents_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["first", "", "  \n ", None, "fifth"])
    assert list(islice(iter(iter_documents(path)), 2)) == ["fifth", "fifth"]  # row 0 is validation


def test_bad_sources_raise(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable text files"):
        iter_documents(str(tmp_path / "empty"))
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no readable text files"):
        iter_documents(str(tmp_path / "t.csv"))
    with pytest.raises(ValueError, match="does not exist"):
        iter_documents(str(tmp_path / "missing.txt"))
    path = write_jsonl(tmp_path / "d.jsonl", ["some text"] * 5, body=["x"] * 5)
    with pytest.raises(ValueError, match="no column 'content'.*text, body"):
        iter_documents(path, text_column="content")
    with pytest.raises(ValueError, match="no non-empty documents"):
        iter_documents(write_jsonl(tmp_path / "e.jsonl", ["", " ", "\n"]))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match="has no rows"):
        iter_documents(str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="rank 4 of 5 gets none of the 4 documents"):
        iter_documents(path, rank=4, world_size=5)  # rows 1-4 are the training documents
    with pytest.raises(ValueError, match="split must be"):
        iter_documents(path, split="test")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("hello")
    write_jsonl(tmp_path / "mixed" / "b.jsonl", ["hello"])
    with pytest.raises(ValueError, match="mixes .jsonl, .txt"):
        iter_documents(str(tmp_path / "mixed"))
    # a Hub id while offline (forced, so the test means the same on a machine with internet)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"seems offline: use local files instead \(--data PATH"):
        iter_documents("HuggingFaceFW/fineweb-edu", name="sample-10BT")


def test_bad_loader_arguments(tmp_path, bpe_tokenizer):
    docs = iter_documents(write_jsonl(tmp_path / "d.jsonl", make_texts(10)))
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        BOSBestFitLoader(bpe_tokenizer, docs, 2, 0)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no bos_token_id"):
        BOSBestFitLoader(no_bos, docs, 2, 8)


# ----------------------------------------------------------------------------------------------------------------------
# streamed (Hub) data: the same code path as a Hub id, fed with local parquet files opened by `load_dataset`

N_FILES, ROWS_PER_FILE, HELD_OUT = 4, 20, 5


@pytest.fixture
def streamed(tmp_path, monkeypatch):
    """Four parquet files opened like a Hub dataset (streaming, one shard per file); texts name their file and row.
    The held-out block is shrunk from 50,000 documents to 5 so that it fits."""
    monkeypatch.setattr(hfnanochat.training.data, "HUB_VAL_DOCS", HELD_OUT)
    texts = [[f"f{f} r{i} " + t for i, t in enumerate(make_texts(ROWS_PER_FILE, seed=f))] for f in range(N_FILES)]
    files = []
    for f, file_texts in enumerate(texts):
        files.append(str(tmp_path / f"part{f}.parquet"))
        pq.write_table(pa.table({"text": file_texts}), files[-1], row_group_size=8)
    splits = datasets.load_dataset("parquet", data_files=files, streaming=True)
    assert splits["train"].num_shards == N_FILES
    return splits, texts


def read_epoch(stream, n):
    """n documents, then check the training stream wraps to its first document."""
    it = iter(stream)
    docs = list(islice(it, n))
    assert stream.epoch == 0 and next(it) == docs[0] and stream.epoch == 1
    return docs


def test_streamed_ranks_read_only_their_files(streamed):
    splits, texts = streamed
    streams = [DocumentStream(splits, rank=r, world_size=2) for r in range(2)]
    # each rank's reader holds 2 of the 4 files: r, r+2 (rank 0's first file starts after the held-out block)
    assert [s._dataset.num_shards for s in streams] == [2, 2]
    expected = [texts[0][HELD_OUT:] + texts[2], texts[1] + texts[3]]
    # read alternately: streams opened from the same splits must not share reading positions
    its = [iter(s) for s in streams]
    seen = [[], []]
    for _ in range(len(expected[0])):
        seen[0].append(next(its[0]))
        seen[1].append(next(its[1]))
    seen[1] += list(islice(its[1], len(expected[1]) - len(expected[0])))
    assert seen == expected
    assert next(its[1]) == texts[1][0] and streams[1].epoch == 1 and streams[0].epoch == 0
    # validation: the first 5 documents, split row-wise whatever the number of ranks
    val = [list(DocumentStream(splits, split="val", rank=r, world_size=2)) for r in range(2)]
    assert val == [texts[0][0:HELD_OUT:2], texts[0][1:HELD_OUT:2]]
    assert list(DocumentStream(splits, split="val")) == texts[0][:HELD_OUT]
    everything = [t for file_texts in texts for t in file_texts]
    assert sorted(seen[0] + seen[1] + val[0] + val[1]) == sorted(everything)  # disjoint, and nothing left out
    assert read_epoch(DocumentStream(splits), len(everything) - HELD_OUT) == everything[HELD_OUT:]


def test_streamed_falls_back_to_rows_when_files_do_not_divide(streamed):
    splits, texts = streamed
    everything = [t for file_texts in texts for t in file_texts]
    for r in range(3):  # 4 files over 3 ranks: every rank reads all files and keeps every third training row
        stream = DocumentStream(splits, rank=r, world_size=3)
        assert stream._dataset.num_shards == N_FILES
        share = everything[HELD_OUT:][r::3]
        assert read_epoch(stream, len(share)) == share
        assert list(DocumentStream(splits, split="val", rank=r, world_size=3)) == texts[0][r:HELD_OUT:3]


def test_streamed_held_out_block_longer_than_first_file(streamed, monkeypatch):
    splits, texts = streamed
    monkeypatch.setattr(hfnanochat.training.data, "HUB_VAL_DOCS", ROWS_PER_FILE + 3)
    # validation stops at the end of the first file; training skips 23 rows, so 3 rows of file 1 are in neither
    assert list(DocumentStream(splits, split="val")) == texts[0]
    train = [read_epoch(DocumentStream(splits, rank=r, world_size=2), n) for r, n in ((0, 20 - 3), (1, 40))]
    assert train == [texts[2][3:], texts[1] + texts[3]]


def test_streamed_own_validation_split(tmp_path, monkeypatch):
    paths = {}
    for split, n in (("train", 30), ("validation", 6)):
        paths[split] = [str(tmp_path / f"{split}{f}.parquet") for f in range(2)]
        for f, path in enumerate(paths[split]):
            pq.write_table(pa.table({"body": [f"{split} {f} {i}" for i in range(n)]}), path)
    splits = datasets.load_dataset("parquet", data_files=paths, streaming=True)
    # no hold-out: all training rows train, and each rank reads one file of each split
    assert read_epoch(DocumentStream(splits, text_column="body", rank=1, world_size=2), 30) == [
        f"train 1 {i}" for i in range(30)
    ]
    assert list(DocumentStream(splits, split="val", text_column="body", rank=1, world_size=2)) == [
        f"validation 1 {i}" for i in range(6)
    ]
    # a lone streamed dataset is a "train" split, so its first 50,000 rows are held out
    with pytest.raises(ValueError, match="'train' split of .* has no rows .*first 50000 rows are validation"):
        DocumentStream(splits["validation"], text_column="body")
    monkeypatch.setattr(hfnanochat.training.data, "HUB_VAL_DOCS", 1)
    lone = DocumentStream(splits["validation"], text_column="body")
    assert read_epoch(lone, 12 - 1) == [f"validation {f} {i}" for f in range(2) for i in range(6)][1:]
    with pytest.raises(ValueError, match="no column 'text'.*body"):
        DocumentStream(splits)
    with pytest.raises(ValueError, match="name='x' picks a Hub dataset config"):
        DocumentStream(splits, text_column="body", name="x")
    with pytest.raises(ValueError, match="source must be a path"):
        DocumentStream(["a list"])


# ----------------------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_exact_resume(tmp_path, bpe_tokenizer, kind):
    path, _ = write_source(tmp_path, kind, make_texts(150, seed=4))

    def new_loader():
        return BOSBestFitLoader(
            bpe_tokenizer, iter_documents(path), batch_size=4, seq_len=48, buffer_size=40, tokenizer_batch_size=8
        )

    loader = new_loader()
    first = [next(loader) for _ in range(5)]
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-able, like a checkpoint
    rest = [next(loader) for _ in range(25)]  # long enough to wrap into the next epoch
    assert loader.epoch >= 1
    resumed = new_loader()
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(rest, (next(resumed) for _ in range(25))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # the running loader can rewind too (its tokenizer thread had read ahead)
    loader.load_state_dict(state)
    assert all(torch.equal(x, rx) for (x, _), (rx, _) in zip(rest[:3], (next(loader) for _ in range(3))))
    assert not torch.equal(first[0][0], rest[0][0])
    # close() drops what the thread read ahead; iterating again carries on as if nothing happened
    paused = new_loader()
    assert all(torch.equal(x, next(paused)[0]) for x, _ in first)
    paused.close()
    assert all(torch.equal(x, next(paused)[0]) for x, _ in rest)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(300, seed=6))
    cpu, gpu = (BOSBestFitLoader(bpe_tokenizer, iter_documents(path), 8, 64, device=d) for d in ("cpu", "cuda"))
    on_gpu = [next(gpu) for _ in range(30)]  # no sync in between: each batch must own its pinned staging buffer
    for x, y in on_gpu:
        cx, cy = next(cpu)
        assert x.is_cuda and x.is_contiguous() and torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)


def test_resume_refuses_other_world_size(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(50))
    state = BOSBestFitLoader(bpe_tokenizer, iter_documents(path, world_size=2), 2, 16).state_dict()
    loader = BOSBestFitLoader(bpe_tokenizer, iter_documents(path), 2, 16)
    with pytest.raises(ValueError, match="rank 0 of 2 cannot resume split 'train', rank 0 of 1"):
        loader.load_state_dict(state)


def test_validation_loader_is_single_pass(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(2000, seed=5))  # 20 validation documents
    loader = BOSBestFitLoader(bpe_tokenizer, iter_documents(path, split="val"), batch_size=2, seq_len=32)
    batches = list(loader)
    assert 1 <= len(batches) <= 10 and loader.epoch == 0
    assert list(loader) == []  # exhausted for good


# ----------------------------------------------------------------------------------------------------------------------
# bits per byte


class TableModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a model whose every probability is known."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids].to(torch.bfloat16))


def test_evaluate_bpb_by_hand(tmp_path):
    table = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    token_bytes = torch.tensor([0, 1, 3, 2], dtype=torch.int32)  # token 0 is special: no bytes
    x1, y1 = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 0]])
    x2, y2 = torch.tensor([[0, 3], [2, 1]]), torch.tensor([[1, -1], [3, 2]])
    nats = n_bytes = 0.0
    for x, y in ((x1, y1), (x2, y2)):
        for prev, target in zip(x.flatten().tolist(), y.flatten().tolist()):
            if target < 0 or token_bytes[target] == 0:
                continue
            row = [float(v) for v in table[prev].to(torch.bfloat16).tolist()]  # exact: these values fit bf16
            nats += math.log(sum(math.exp(v) for v in row)) - row[target]
            n_bytes += int(token_bytes[target])
    expected = nats / (math.log(2) * n_bytes)  # 5 counted targets: 3 + 2 + 1 + 2 + 3 bytes
    assert n_bytes == 11
    model = TableModel(table)
    assert evaluate_bpb(model, [(x1, y1), (x2, y2)], token_bytes) == pytest.approx(expected, rel=1e-6)
    assert evaluate_bpb(model, [(x1[:, 2:], y1[:, 2:])], token_bytes) == math.inf  # only a special target

    # under torch.distributed the sums are all-reduced (one gloo rank here: the same number)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert evaluate_bpb(model, [(x1, y1), (x2, y2)], token_bytes) == pytest.approx(expected, rel=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1])
def test_streamed_exact_resume(streamed, bpe_tokenizer, rank):
    splits, _ = streamed

    def new_loader():
        return BOSBestFitLoader(
            bpe_tokenizer,
            DocumentStream(splits, rank=rank, world_size=2),
            batch_size=2,
            seq_len=32,
            buffer_size=10,
            tokenizer_batch_size=4,
        )

    loader = new_loader()
    for _ in range(3):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    rest = [next(loader) for _ in range(20)]  # 35 or 40 documents of ~25 tokens: wraps into epoch 1
    assert loader.epoch >= 1
    resumed = new_loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(rest, resumed))
