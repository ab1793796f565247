"""The bridges: stock transformers NanoChat export, original nanochat checkpoint import, and the quickstart."""

import json
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch
from nanochat_reference import nanochat_forward, random_nanochat_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfnanochat
from hfnanochat.convert import hf_to_native, nanochat_to_hf
from hfnanochat.convert import main as convert_main
from hfnanochat.tokenizer import SPECIAL_TOKENS, train_tokenizer
from hfnanochat.training.export import save_final

WORDS = (
    "the model learns to predict the next token from text gathered on the web and in books while numbers like 12 "
    "and 3.14 appear beside names such as Paris Tokyo and Lagos; questions, answers, code = print(x) and more"
).split()


def fresh_python(script: str, cwd) -> subprocess.CompletedProcess:
    """Run `script` in a new interpreter in which importing hfnanochat fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    guard = "import sys\nsys.modules['hfnanochat'] = None\n"
    return subprocess.run([sys.executable, "-c", guard + script], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ter", "an", "os", "ble", "qu", "ix", "zo", "ph", "ru", "ent", "ing", "é", "ß"]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    docs = [" ".join(rng.choice(WORDS + made_up) for _ in range(rng.randint(20, 80))) for _ in range(1500)]
    return train_tokenizer(docs, vocab_size=512)


def random_weights_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tiny_folder(tmp_path, tokenizer, **options):
    config = hfnanochat.HFNanoChatConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )
    model = random_weights_(hfnanochat.HFNanoChatForCausalLM(config)).eval()
    folder = tmp_path / "ours"
    save_final(model, tokenizer, folder)
    return model, folder


def test_native_export_loads_in_stock_transformers_with_equal_logits(tmp_path, tokenizer):
    model, folder = tiny_folder(tmp_path, tokenizer)
    native = tmp_path / "native"
    convert_main(["hf-to-native", str(folder), str(native)])
    config = json.loads((native / "config.json").read_text())
    assert config["model_type"] == "nanochat" and "auto_map" not in config
    assert not list(native.glob("*.py"))
    ids = torch.tensor([tokenizer.encode("the model learns 12 words", add_special_tokens=False)])
    torch.save({"ids": ids, "logits": model(input_ids=ids, use_cache=False).logits}, tmp_path / "expected.pt")
    result = fresh_python(
        f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, NanoChatForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(native)!r}, dtype=torch.float32).eval()
assert type(m) is NanoChatForCausalLM, type(m)
ref = torch.load({str(tmp_path / "expected.pt")!r})
diff = (m(input_ids=ref["ids"]).logits - ref["logits"]).abs().max().item()
assert diff <= 1e-5, diff
tok = AutoTokenizer.from_pretrained({str(native)!r})
messages = [{{"role": "user", "content": "hi"}}]
prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = m.generate(**prompt, max_new_tokens=5, do_sample=False)
print("OK", diff)
""",
        tmp_path,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_native_export_refuses_2026_options(tmp_path, tokenizer):
    _, folder = tiny_folder(tmp_path, tokenizer, window_pattern="SL")
    with pytest.raises(ValueError, match="cannot express"):
        hf_to_native(folder, tmp_path / "native")


def test_quickstart_pipeline_in_fresh_process(tmp_path, tokenizer):
    """The issue's quickstart: save model + tokenizer, then pipeline(...) in a process that never imports hfnanochat."""
    _, folder = tiny_folder(tmp_path, tokenizer)
    result = fresh_python(
        f"""
from transformers import pipeline
chat = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True)
out = chat([{{"role": "user", "content": "hi"}}], max_new_tokens=4, do_sample=False)
assert out[0]["generated_text"][-1]["role"] == "assistant", out
print("OK")
""",
        tmp_path,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# -- original nanochat checkpoints --------------------------------------------------------------------------------


def tiktoken_encoding(tokenizer):
    """nanochat's tokenizer.pkl content: a tiktoken Encoding, built from our trained BPE (ranks = ids)."""
    tiktoken = pytest.importorskip("tiktoken")
    from hfnanochat.tokenizer import SPLIT_PATTERN

    byte_decoder = {c: b for b, c in __import__("hfnanochat.convert", fromlist=["x"])._bytes_to_unicode().items()}
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    ranks = {bytes(byte_decoder[c] for c in token): idx for token, idx in vocab.items()}
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def write_nanochat_checkpoint(root, cfg, state, step=100, extra_meta=None):
    ckpt = root / "base_checkpoints" / f"d{cfg['n_layer']}"
    ckpt.mkdir(parents=True)
    # keys as saved by a torch.compile'd model
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, ckpt / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.0, "model_config": dict(cfg, **(extra_meta or {}))}
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize("revision", ["seed", "2026"])
def test_nanochat_checkpoint_import_gives_equal_logits(tmp_path, tokenizer, revision):
    enc = tiktoken_encoding(tokenizer)
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    with open(tok_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    V = enc.n_vocab
    cfg = dict(sequence_len=256, vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    head = revision == "2026"
    padded = -(-V // 64) * 64 + (64 if head else 0)  # 2026 checkpoints carry padded vocabulary rows
    state = random_nanochat_state_dict(cfg, head_2026=head, padded_vocab=padded if head else None)
    ckpt = write_nanochat_checkpoint(tmp_path, cfg, state, extra_meta={"window_pattern": "SSL"} if head else None)
    out = tmp_path / "converted"
    convert_main(["nanochat-to-hf", str(ckpt), str(out), "--tokenizer-dir", str(tok_dir)])

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.smear == head and model.config.window_pattern == ("SSL" if head else "L")
    text = "the model learns 12 words, Paris and Tokyo! <|bos|> stays text"
    ids = enc.encode_ordinary(text)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == ids
    assert hf_tok.convert_tokens_to_ids("<|bos|>") == enc.encode_single_token("<|bos|>")
    x = torch.tensor([ids])
    ours = model(input_ids=x, use_cache=False).logits
    ref = nanochat_forward(
        {k: v for k, v in state.items()},
        cfg,
        x,
        rope_base=100000.0 if head else 10000.0,
        window_pattern="SSL" if head else "L",
        qk_scale=1.2 if head else 1.0,
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {
        enc.encode_single_token("<|assistant_end|>"),
        enc.encode_single_token("<|bos|>"),
    }


def test_nanochat_import_rejects_missing_keys(tmp_path):
    cfg = dict(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    state = random_nanochat_state_dict(cfg)
    del state["transformer.h.1.mlp.c_fc.weight"]
    ckpt = write_nanochat_checkpoint(tmp_path, cfg, state)
    with pytest.raises(ValueError, match="missing keys.*transformer.h.1.mlp.c_fc.weight"):
        nanochat_to_hf(ckpt, tmp_path / "out")
    with pytest.raises(ValueError, match="no model_NNNNNN.pt"):
        nanochat_to_hf(tmp_path, tmp_path / "out2")
