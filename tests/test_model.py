"""The model as a transformers citizen: shapes, loss, init, generation/cache/padding, save/load, fidelity."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from nanochat_reference import nanochat_forward, random_nanochat_state_dict
from transformers import AutoModelForCausalLM

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM, config_for_depth
from hfnanochat.inference.engine import Engine
from hfnanochat.inference.fast_decode import FusedQKVAttention, fast_decode
from hfnanochat.modeling_hfnanochat import HFNanoChatAttention


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=97,  # not a multiple of 64: exercises the padded LM-head matmul
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=96,
        eos_token_id=95,
        pad_token_id=95,
    )
    kwargs.update(overrides)
    return HFNanoChatConfig(**kwargs)


def random_model(config, seed=0):
    """A model with every weight non-zero (nanochat zero-inits projections and the head, which hides bugs)."""
    torch.manual_seed(seed)
    model = HFNanoChatForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 2 else 0.1) + (1.0 if "lambdas" in name else 0.0))
    return model.eval()


ALL_2026 = dict(
    window_pattern="SSL",
    short_window=4,
    value_embeddings=True,
    residual_scalars=True,
    qk_scale=1.2,
    smear=True,
    backout=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)


def test_seed_d20_param_count_and_flops():
    config = config_for_depth(20)
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (1280, 10, 128)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, HFNanoChatForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == 560_988_160
    assert model.estimate_flops() == pytest.approx(3.49e9, rel=2e-3)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        HFNanoChatConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        HFNanoChatConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="window_pattern"):
        HFNanoChatConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="init_scheme"):
        HFNanoChatConfig(init_scheme="xavier")
    with pytest.raises(ValueError, match="depth 5"):
        config_for_depth(5)


def test_forward_loss_is_fp32_softcapped_shifted_cross_entropy():
    model = random_model(tiny_config())
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels, use_cache=False)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (2, 12, 97)
    assert out.logits.abs().max() <= 15.0
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    groups = model.optimizer_param_groups()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for ps in groups.values() for p in ps)


def test_logits_to_keep():
    model = random_model(tiny_config())
    ids = torch.randint(0, 97, (2, 9))
    full = model(input_ids=ids, use_cache=False).logits
    last = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:])


@pytest.mark.parametrize("options", [{}, ALL_2026], ids=["seed", "2026"])
def test_logits_equal_independent_nanochat_forward(options):
    config = tiny_config(num_hidden_layers=4, **options)
    cfg = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, vocab_size=97, sequence_len=64)
    sd = random_nanochat_state_dict(cfg, head_2026=bool(options))
    from hfnanochat.convert import nanochat_state_dict_to_hf

    model = HFNanoChatForCausalLM(config).eval()
    model.load_state_dict(nanochat_state_dict_to_hf(sd, config), strict=True)
    ids = torch.randint(0, 97, (2, 16))
    ours = model(input_ids=ids, use_cache=False).logits
    ref = nanochat_forward(
        sd,
        cfg,
        ids,
        rope_base=config.rope_parameters["rope_theta"],
        window_pattern=config.window_pattern,
        qk_scale=config.qk_scale,
        short_window=config.resolved_short_window(),
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_meta_device_construction_and_seed_init():
    config = config_for_depth(4, vocab_size=512, max_seq_len=128)
    torch.manual_seed(0)
    model = HFNanoChatForCausalLM.from_config_on_device(config, "cpu")
    assert all(not p.is_meta for p in model.parameters())
    layer = model.model.layers[0]
    assert model.lm_head.weight.abs().sum() == 0
    assert layer.self_attn.o_proj.weight.abs().sum() == 0 and layer.mlp.fc2.weight.abs().sum() == 0
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(1.0, rel=0.05)
    d = config.hidden_size
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(d**-0.5, rel=0.1)
    # c_fc: fan_in d, fan_out 4d -> std 1/sqrt(d) * min(1, 2) = 1/sqrt(d)
    assert layer.mlp.fc1.weight.std().item() == pytest.approx(d**-0.5, rel=0.1)


def test_2026_init_and_param_groups_cover_every_parameter_once():
    config = tiny_config(init_scheme="2026", **ALL_2026)
    model = HFNanoChatForCausalLM.from_config_on_device(config)
    m = model.model
    torch.testing.assert_close(m.resid_lambdas[0], torch.tensor(1.15))
    torch.testing.assert_close(m.x0_lambdas[-1], torch.tensor(0.05))
    assert m.smear_lambda.item() == 0.0 and m.backout_lambda.item() == pytest.approx(0.2)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.2)
    groups = model.optimizer_param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert len(groups["value_embedding"]) == 2  # 3 layers: layers 0 and 2 (the last one always has one)


def greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=95, eos_token_id=None, **kw)


@pytest.mark.parametrize("options", [{}, ALL_2026], ids=["seed", "2026"])
def test_generate_with_cache_equals_without(options):
    model = random_model(tiny_config(**options))
    ids = torch.randint(0, 95, (2, 7))
    with_cache = greedy(model, ids, 12)
    without = greedy(model, ids, 12, use_cache=False)
    assert torch.equal(with_cache, without)
    # and equals a plain argmax loop over full forwards
    seq = ids
    for _ in range(12):
        nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(with_cache, seq)


def test_static_cache_generation_matches_dynamic():
    model = random_model(tiny_config())
    ids = torch.randint(0, 95, (1, 6))
    assert torch.equal(greedy(model, ids, 10), greedy(model, ids, 10, cache_implementation="static"))


def test_left_padded_batch_equals_one_by_one():
    model = random_model(tiny_config())
    prompts = [torch.randint(0, 95, (n,)) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), 95)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    batched = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=95, eos_token_id=None
    )
    for i, p in enumerate(prompts):
        single = greedy(model, p[None], 8)
        assert torch.equal(batched[i, width:], single[0, len(p) :]), f"row {i}"


def test_packed_rows_do_not_attend_across_documents():
    """TRL packing sends one row with position_ids restarting at 0: documents must stay independent."""
    model = random_model(tiny_config())
    a, b = torch.randint(0, 95, (1, 5)), torch.randint(0, 95, (1, 7))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    out = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(out[:, :5], model(input_ids=a, use_cache=False).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(input_ids=b, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree():
    model = random_model(tiny_config(**ALL_2026))
    ids = torch.randint(0, 95, (2, 11))
    sdpa = model(input_ids=ids, use_cache=False).logits
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_trl_fused_head_loss_matches_forward():
    """TRL's SFT/GRPO loss multiplies the backbone output by lm_head.weight and softcaps from the config."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = random_model(tiny_config())
    ids = torch.randint(0, 95, (2, 10))
    expected = model(input_ids=ids, labels=ids, use_cache=False).loss
    trl_utils.add_fused_lm_head(model)
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_grads():
    model = random_model(tiny_config()).train()
    ids = torch.randint(0, 95, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_save_load_round_trip_in_process(tmp_path):
    model = random_model(tiny_config(**ALL_2026))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 95, (1, 9))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fresh_process_loads_with_trust_remote_code_without_hfnanochat(tmp_path):
    import json
    import subprocess
    import sys

    model = random_model(tiny_config(**ALL_2026))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hfnanochat"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hfnanochat.HFNanoChatForCausalLM"
    assert (tmp_path / "modeling_hfnanochat.py").exists() and (tmp_path / "configuration_hfnanochat.py").exists()
    ids = torch.randint(0, 95, (1, 9))
    expected = model(input_ids=ids, use_cache=False).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["hfnanochat"] = None  # any attempt to import the package now fails
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, dtype=torch.float32).eval()
ref = torch.load({str(tmp_path / "expected.pt")!r})
out = m(input_ids=ref["ids"], use_cache=False).logits
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
assert torch.allclose(out, ref["logits"], atol=1e-5), (out - ref["logits"]).abs().max()
gen = m.generate(ref["ids"], max_new_tokens=4, do_sample=False, pad_token_id=95, eos_token_id=None)
assert gen.shape == (1, 13)
print("OK")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_static_cache_generation_with_fullgraph_compile():
    """The GPU decode path: a static cache and a fullgraph-compiled forward (no graph breaks) give the same tokens."""
    model = random_model(tiny_config())
    ids = torch.randint(0, 95, (1, 6))
    expected = greedy(model, ids, 8)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    assert torch.equal(greedy(model, ids, 8, cache_implementation="static"), expected)


def test_chunked_loss_equals_full_loss_and_grads():
    model = random_model(tiny_config()).train()
    ids = torch.randint(0, 95, (3, 20))
    labels = ids.clone()
    labels[1, :7] = -100
    full = model(input_ids=ids, labels=labels)
    full.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(input_ids=ids, labels=labels, loss_chunk_size=16)  # 60 tokens: chunks of 16, 16, 16, 12
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss, atol=1e-6, rtol=1e-6)
    chunked.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("softcap", [15.0, None])
def test_chunked_loss_under_bf16_autocast_matches_full_loss(softcap):
    """The fused chunked head computes its gradients in the forward pass, in the autocast dtype like the plain head."""
    model = random_model(tiny_config(final_logit_softcapping=softcap)).train()
    ids = torch.randint(0, 95, (2, 40))
    results = []
    for chunk in (0, 32):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, loss_chunk_size=chunk).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full_loss, full_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, full_loss, atol=2e-3, rtol=2e-3)
    for name, grad in full_grads.items():
        assert chunked_grads[name].dtype == grad.dtype == torch.float32
        rel = (chunked_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert rel < 2e-2, (name, rel)


def test_plain_causal_sdpa_passes_no_mask_and_matches_masked_attention():
    """Training rows without padding reach SDPA with no mask tensor (is_causal=True, the flash kernel on GPU) and
    give the same logits as the explicit causal mask path."""
    model = random_model(tiny_config())
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 95, (2, 24))
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        plain = model(input_ids=ids, use_cache=False).logits
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    layers = model.config.num_hidden_layers
    assert all(mask is None and causal for mask, causal in seen[:layers])
    torch.testing.assert_close(plain, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"smear": True, "value_embeddings": True}], ids=["seed", "smear+ve"])
def test_right_padded_rows_attend_without_a_mask_and_keep_the_loss(options):
    """`right_padded=True` (our SFT collator's flag): SDPA gets no mask tensor, and the loss, its gradients and the
    real tokens' logits equal the masked run's, through forward and through TRL's fused head."""
    model = random_model(tiny_config(**options)).train()
    model.set_attn_implementation("sdpa")
    lengths = (24, 15, 9)
    ids = torch.full((3, 24), 95)
    mask = torch.zeros(3, 24, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, 95, (n,))
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    runs = {}
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        for flag in (False, True):
            model.zero_grad()
            seen.clear()
            extra = {"right_padded": True} if flag else {}
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, **extra)
            out.loss.backward()
            runs[flag] = (
                out.loss.detach(),
                out.logits.detach(),
                {n: q.grad.clone() for n, q in model.named_parameters()},
            )
            assert all((m is None) == flag for m in seen), flag
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    (loss_m, logits_m, grads_m), (loss_r, logits_r, grads_r) = runs[False], runs[True]
    torch.testing.assert_close(loss_r, loss_m, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits_r[i, :n], logits_m[i, :n], atol=1e-4, rtol=1e-4)
    for name in grads_m:
        torch.testing.assert_close(grads_r[name], grads_m[name], atol=1e-4, rtol=1e-4, msg=name)

    trl_utils = pytest.importorskip("trl.trainer.utils")
    trl_utils.add_fused_lm_head(model)
    fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, right_padded=True)
    mask_fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(fused.log_probs, mask_fused.log_probs, atol=1e-4, rtol=1e-4)


def test_padded_head_matmul_equals_plain_projection():
    """vocab 97 is computed as 128 columns for large batches of rows (and unpadded for a few decode rows)."""
    model = random_model(tiny_config())
    assert model.config.padded_vocab_size == 128
    for rows in (3, 300):
        hidden = torch.randn(1, rows, 64)
        expected = 15.0 * torch.tanh((hidden @ model.lm_head.weight.T).float() / 15.0)
        torch.testing.assert_close(model.compute_logits(hidden), expected, atol=1e-5, rtol=1e-5)


def test_fast_decode_fused_qkv_equals_separate_projections_and_never_goes_stale():
    model = random_model(tiny_config(**ALL_2026))  # GQA: q is wider than k and v
    ids = torch.randint(0, 97, (2, 12))
    keys = set(model.state_dict())
    with torch.no_grad():
        separate = model(input_ids=ids).logits
        with fast_decode(model):
            fused = model(input_ids=ids).logits
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
        attn = model.model.layers[0].self_attn
        assert attn.qkv_weight.shape == (4 * 16 + 2 * 2 * 16, 64) and type(attn) is HFNanoChatAttention
        assert set(model.state_dict()) == keys  # the stack is not a weight: checkpoints are unchanged

        # a weight update (an RL step) between two generations: the next refreshing entry restacks it
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(-1.5)
        changed = model(input_ids=ids).logits
        assert not torch.allclose(changed, separate)
        with fast_decode(model):
            torch.testing.assert_close(model(input_ids=ids).logits, changed, rtol=1e-5, atol=1e-5)
        stack = attn.qkv_weight
        with fast_decode(model):  # restacked in place: a CUDA graph keeps reading the same buffer
            assert attn.qkv_weight is stack

    # with autograd on the real projections run, so gradients reach q_proj, k_proj and v_proj
    with fast_decode(model):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(model.model.layers[0].self_attn.get_submodule(n).weight.grad is not None
               for n in ("q_proj", "k_proj", "v_proj"))  # fmt: skip


def test_fast_decode_contexts_on_one_model_may_overlap_and_the_last_out_restores():
    """Two engines on one model, or a Space's engine threads, hold fast_decode at overlapping times: the first in swaps
    the classes, the last out restores them. (Each context restoring what it found would let the second one out put
    the first one's fast classes back for good, with a q/k/v stack that goes stale at the next weight update.)"""
    model = random_model(tiny_config())
    attn = model.model.layers[0].self_attn
    first, second = fast_decode(model), fast_decode(model)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert isinstance(attn, FusedQKVAttention)  # the second still decodes fast
    second.__exit__(None, None, None)
    assert type(attn) is HFNanoChatAttention

    inside, seen = threading.Barrier(4), []

    def hold(delay):
        with fast_decode(model):
            inside.wait(timeout=30)
            seen.append(isinstance(attn, FusedQKVAttention))
            time.sleep(delay)  # leave one after another

    threads = [threading.Thread(target=hold, args=(0.05 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == [True] * 4 and type(attn) is HFNanoChatAttention

    # two engines' generations interleaved, token by token: each makes the tokens it makes alone
    prompt = [1, 5, 9, 33, 70]
    alone = Engine(model, None, compile=False).generate_batch([prompt], max_new_tokens=6, temperature=0.0)
    one, two = (Engine(model, None, compile=False).generate([prompt], max_new_tokens=6, temperature=0.0) for _ in "ab")
    tokens = {0: [], 1: []}
    for step_one, step_two in zip(one, two):
        tokens[0].append(step_one[0][0])
        tokens[1].append(step_two[0][0])
    one.close(), two.close()  # the first ended inside zip; the second leaves its context here
    assert tokens[0] == tokens[1] == alone[0][0].tokens
    assert type(attn) is HFNanoChatAttention


def test_rope_tables_are_the_per_position_cos_sin_and_survive_every_load_path(tmp_path):
    """The RoPE lookup tables hold fp32 cos/sin of position * inv_freq (nanochat's values, cast on use) for 10x the
    context, and are rebuilt, not left as garbage, when a model is materialised from the meta device or loaded."""
    config = tiny_config()
    rotary = HFNanoChatForCausalLM(config).model.rotary_emb
    assert (
        rotary.cos_table.shape == (10 * 64, 8)
        and "rotary_emb.cos_table" not in HFNanoChatForCausalLM(config).state_dict()
    )
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    positions = torch.tensor([[0, 5, 639]])
    cos, sin = rotary(torch.zeros(1, dtype=torch.bfloat16), positions)
    angles = positions[..., None].float() * inv_freq
    assert torch.equal(cos[:, :, 0], angles.cos().bfloat16()) and torch.equal(sin[:, :, 0], angles.sin().bfloat16())

    built = HFNanoChatForCausalLM.from_config_on_device(config, "cpu")
    built.save_pretrained(tmp_path)
    loaded = HFNanoChatForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for model in (built, loaded):
        torch.testing.assert_close(model.model.rotary_emb.cos_table.float(), rotary.cos_table, atol=4e-3, rtol=0)
        torch.testing.assert_close(model.model.rotary_emb.sin_table.float(), rotary.sin_table, atol=4e-3, rtol=0)
