"""hfnanochat through the ecosystem's front doors: PEFT LoRA, `pipeline("text-generation")` with chat messages,
the Auto classes with and without hfnanochat in the process, and AutoTokenizer on a final folder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_engine import syllable_text
from transformers import AutoModelForCausalLM, pipeline

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM
from hfnanochat.tokenizer import train_tokenizer
from hfnanochat.training.export import save_final

OPTIONS_2026 = dict(window_pattern="SSSL", short_window=4, value_embeddings=True, residual_scalars=True, smear=True,
                    backout=True, qk_scale=1.2, init_scheme="2026")  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(syllable_text(), vocab_size=512)


def tiny_model(tokenizer, options=None, seed=0) -> HFNanoChatForCausalLM:
    config = HFNanoChatConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        **(options or {}),
    )
    torch.manual_seed(seed)
    model = HFNanoChatForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def final_folder(tokenizer, tmp_path_factory):
    return save_final(tiny_model(tokenizer, OPTIONS_2026), tokenizer, tmp_path_factory.mktemp("final") / "model")


@pytest.mark.parametrize("options", [{}, OPTIONS_2026], ids=["seed", "2026"])
def test_lora_on_attention_and_mlp_trains_and_merges(tokenizer, options):
    model = tiny_model(tokenizer, options)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {t for t in targets if any(f".{t}.lora_A" in n for n in trainable)} == set(targets)
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert type(merged) is HFNanoChatForCausalLM
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_text_generation_pipeline_with_chat_messages(tokenizer):
    model = tiny_model(tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    chat = [{"role": "user", "content": "baba keke 12*3"}]
    out = generator(chat, max_new_tokens=6, do_sample=False)
    messages = out[0]["generated_text"]
    assert messages[0] == chat[0] and messages[-1]["role"] == "assistant"
    # the same tokens as generate() on the rendered chat
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert messages[-1]["content"] == tokenizer.decode(ids, skip_special_tokens=True)


def test_auto_class_without_trust_remote_code_after_import(final_folder):
    model = AutoModelForCausalLM.from_pretrained(final_folder)
    assert type(model) is HFNanoChatForCausalLM and model.config.smear


LOAD_WITHOUT_HFNANOCHAT = textwrap.dedent(
    """
    import json, sys, time
    sys.modules["hfnanochat"] = None  # not importable here: the folder's own code must do
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sys.argv[1]
    start = time.time()
    tok = AutoTokenizer.from_pretrained(folder)
    tok_seconds = time.time() - start
    print("\\nQUIET TOKENIZER LOAD")
    quiet = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("baba keke 12*3")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    print("\\nRESULT " + json.dumps({"class": type(model).__module__, "tokenizer": type(tok).__name__,
        "ids": ids[0].tolist(), "quiet_ids": quiet.encode("baba keke 12*3"), "tok_seconds": tok_seconds,
        "logits": logits.tolist()}))
    """
)


def test_folder_loads_where_hfnanochat_is_not_importable(final_folder, tokenizer):
    """The model loads from the folder's own modeling file; AutoTokenizer needs no remote code.

    transformers' AutoTokenizer reads the model config first, and a folder whose config has remote code makes it
    ask the trust_remote_code question (waiting up to 15 s for an answer) whatever the tokenizer files say. With no
    terminal to ask on (stdin closed) it goes on at once; `trust_remote_code=False` skips the question."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HFNANOCHAT, str(final_folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=final_folder.parent,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    quiet_part = done.stdout.split("QUIET TOKENIZER LOAD", 1)[1].split("RESULT ", 1)[0]
    assert "custom code" not in quiet_part
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["class"].startswith("transformers_modules.")
    assert result["tok_seconds"] < 10  # the question would wait 15 s for an answer
    assert result["ids"] == result["quiet_ids"] == tokenizer.encode("baba keke 12*3")
    ours = AutoModelForCausalLM.from_pretrained(final_folder).eval()
    with torch.no_grad():
        expected = ours(input_ids=torch.tensor([result["ids"]])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)
