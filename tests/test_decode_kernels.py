"""The Triton decode kernels (`hfnanochat.inference.decode_kernels`) against the unfused ops they replace, and the
engine with them against the engine without them.

Triton runs on CUDA, or on CPU under its interpreter, which must be switched on before Triton is first imported. So on
a machine without a GPU, `test_kernels_under_the_triton_interpreter` re-runs this file in a fresh process with
`TRITON_INTERPRET=1`; on a GPU the kernel tests run directly.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hfnanochat.inference import decode_kernels
from hfnanochat.inference.engine import Engine
from hfnanochat.inference.fast_decode import (
    FusedQKVAttention,
    GemvHead,
    InPlaceCacheBackbone,
    KernelAttention,
    KernelBlock,
    fast_decode,
)
from hfnanochat.modeling_hfnanochat import HFNanoChatForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from test_engine import ALL_2026, random_model, tiny_config  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    decode_kernels.triton is None or not (torch.cuda.is_available() or INTERPRETED),
    reason="Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1 (test_kernels_under_the_triton_interpreter)",
)


def next_token_logits(model, prompt: list[int], token: int) -> torch.Tensor:
    """Logits of one decode step: prefill `prompt` into a cache, then feed `token`."""
    prefill = model(torch.tensor([prompt], device=DEVICE), use_cache=True)
    cache = getattr(prefill, "cache", None) or prefill.past_key_values  # renamed during transformers 5.x
    return model(torch.tensor([[token]], device=DEVICE), cache=cache, use_cache=True).logits


def ulps(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at the magnitude of x (the tolerance for a different rounding order)."""
    return x.abs().clamp(min=1.0) * torch.finfo(dtype).eps


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(200, 96), (40, 1030)])  # rows left over in the last block; K past one block
def test_gemv_equals_norm_linear_relu2_residual(dtype, n, k):
    torch.manual_seed(0)
    x = torch.randn(1, 1, k, device=DEVICE).to(dtype) * 3
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    residual = torch.randn(1, 1, n, device=DEVICE).to(dtype)
    normed = F.rms_norm(x, (k,), eps=1e-6)
    cases = {
        "plain": (decode_kernels.gemv(x, weight), F.linear(x, weight)),
        "norm": (decode_kernels.gemv(x, weight, norm_eps=1e-6), F.linear(normed, weight)),
        "norm+relu2": (
            decode_kernels.gemv(x, weight, norm_eps=1e-6, relu_square=True),
            F.relu(F.linear(normed, weight)).square(),
        ),
        "residual": (decode_kernels.gemv(x, weight, residual=residual), residual + F.linear(x, weight)),
    }
    for name, (ours, ref) in cases.items():
        assert ours.shape == ref.shape and ours.dtype == dtype, name
        # fp32: summation order only; bf16: at most a couple of roundings apart (ReLU² doubles a relative error)
        tolerance = 1e-5 if dtype == torch.float32 else 4 * ulps(ref.float(), dtype)
        assert ((ours.float() - ref.float()).abs() <= tolerance).all(), name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_with_gqa_padding_and_unwritten_slots(dtype):
    torch.manual_seed(0)
    B, H, Hkv, S, D = 3, 4, 2, 150, 16  # S: not a multiple of the chunk
    q = torch.randn(B, 1, H, D, device=DEVICE).to(dtype).transpose(1, 2)  # the model's layout: a transposed view
    k, v = (torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype) for _ in range(2))
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :100] = True  # a static cache written up to slot 100
    mask[1, ..., 37:120] = True  # left padding, then unwritten slots
    mask[2, ..., 149] = True  # one slot, in the last chunk
    ours = decode_kernels.decode_attention(q, k, v, mask, scaling=0.3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3, enable_gqa=True)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), ref.transpose(1, 2), atol=tolerance, rtol=tolerance)
    # what a masked slot holds never leaks in, not even inf or NaN (an unwritten or stale static-cache slot)
    hidden = ~mask[:, 0, 0][:, None, :, None].expand_as(k)
    k_dirty, v_dirty = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("inf"))
    torch.testing.assert_close(decode_kernels.decode_attention(q, k_dirty, v_dirty, mask, scaling=0.3), ours)
    nothing = torch.zeros_like(mask)
    assert (decode_kernels.decode_attention(q, k, v, nothing, 0.3) == 0).all()  # never NaN
    # the last program of a head merges its chunks, counted with atomics: on a GPU, where the programs race, every
    # launch must find all the chunks' results (the same output, bit for bit) and leave the counters at zero
    for _ in range(1 if INTERPRETED else 200):
        assert torch.equal(decode_kernels.decode_attention(q, k, v, mask, scaling=0.3), ours)
    assert not decode_kernels._arrivals(q.device).any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_scale", [1.0, 1.2])
def test_decode_attention_in_place_equals_rotary_norm_cache_update_and_sdpa(dtype, qk_scale):
    from hfnanochat.modeling_hfnanochat import apply_rotary, rms_norm

    torch.manual_seed(0)
    B, H, Hkv, S, D, slot = 3, 4, 2, 150, 16, 70  # three chunks of the cache; the new token in the second
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device=DEVICE).to(dtype) * 2  # the GEMV's output, split as views
    q, k, v = (t.view(B, 1, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    angles = torch.rand(B, 1, 1, D // 2, device=DEVICE) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    keys, values = (torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype) for _ in range(2))
    keys[:, :, slot:] = float("nan")  # the new token's slot and the unwritten ones after it: never read
    values[:, :, slot:] = float("inf")
    keys_before, values_before = keys.clone(), values.clone()
    length = torch.tensor(slot, device=DEVICE)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    mask[..., : slot + 1] = True
    mask[1, ..., :37] = False  # left padding

    def expected(x):  # fp32 math on the same bf16 inputs, one rounding (as Inductor fuses the unfused ops)
        y = rms_norm(apply_rotary(x.float(), cos.float(), sin.float()), 1e-6).to(dtype)
        return (y.float() * qk_scale).to(dtype) if qk_scale != 1.0 else y

    ours = decode_kernels.decode_attention_in_place(q, k, v, cos, sin, keys, values, length, mask, 1e-6, qk_scale, 0.3)
    assert ours.shape == (B, 1, H, D) and ours.dtype == dtype
    # the cache as StaticLayer.update leaves it: the new key (rotated, normed) and value at the slot, nothing else
    written = keys[:, :, slot].float() - expected(k)[:, 0].float()
    assert (written.abs() <= (1e-5 if dtype == torch.float32 else 2 * ulps(keys[:, :, slot].float(), dtype))).all()
    assert torch.equal(values[:, :, slot], v[:, 0])
    others = [s for s in range(S) if s != slot]
    assert torch.equal(keys[:, :, others].isnan(), keys_before[:, :, others].isnan())
    assert torch.equal(keys[:, :, others].nan_to_num(), keys_before[:, :, others].nan_to_num())
    assert torch.equal(values[:, :, others], values_before[:, :, others])
    assert length.item() == slot  # the caller moves the length on (the model does it once for all layers)
    # the attention over that cache
    ref = F.scaled_dot_product_attention(expected(q).transpose(1, 2).float(), keys.float().nan_to_num(),
                                         values.float().nan_to_num(posinf=0.0), attn_mask=mask, scale=0.3,
                                         enable_gqa=True)  # fmt: skip
    ref = ref.transpose(1, 2)
    # bf16: the output's rounding, and q's. Triton's interpreter rounds fp32 to bf16 toward zero (CUDA: to nearest),
    # so there q can be an ulp off the reference, twice with a qk scale.
    tolerance = 1e-5 if dtype == torch.float32 else (3 if INTERPRETED else 2) * ulps(ref, dtype)
    assert ((ours.float() - ref).abs() <= tolerance).all()
    assert not decode_kernels._arrivals(q.device).any()  # the merge counters are back to zero for the next launch
    # one cos/sin row shared by all rows (rows at one position)
    shared = decode_kernels.decode_attention_in_place(q[:1], k[:1], v[:1], cos[:1], sin[:1], keys[:1], values[:1],
                                                      length, mask[:1], 1e-6, qk_scale, 0.3)  # fmt: skip
    torch.testing.assert_close(shared, ours[:1])
    # a slot past the cache writes nothing
    keys_full, values_full = keys.clone(), values.clone()
    decode_kernels.decode_attention_in_place(q, k, v, cos, sin, keys, values, torch.tensor(S, device=DEVICE), mask,
                                             1e-6, qk_scale, 0.3)  # fmt: skip
    assert torch.equal(keys.nan_to_num(), keys_full.nan_to_num()) and torch.equal(values, values_full)


@needs_triton
def test_decode_step_over_a_static_cache_writes_it_in_place_like_update(monkeypatch):
    """With the decode kernels on, a one-token step over a StaticCache writes each layer's key and value in its
    attention kernel and moves every layer's length on once, after the last layer: same cache, same logits as
    StaticLayer.update under the unfused forward. A prefill (many tokens) keeps update."""
    from transformers import StaticCache

    model = random_model(tiny_config()).to(DEVICE)
    prompt, step = torch.tensor([[1, 5, 9, 33, 70]], device=DEVICE), torch.tensor([[7]], device=DEVICE)

    def run(fast: bool):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad(), fast_decode(model) if fast else contextlib.nullcontext():
            model(prompt, cache=cache, use_cache=True)
            logits = model(step, cache=cache, use_cache=True).logits
        return logits, cache

    calls = []  # a spy: the real kernel runs, and we see that the step went through it once per layer

    real = decode_kernels.decode_attention_in_place

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_kernels, "decode_attention_in_place", counted)
    reference, reference_cache = run(fast=False)
    assert not calls
    fused, cache = run(fast=True)
    assert len(calls) == model.config.num_hidden_layers  # the decode step's layers; the prefill kept update
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(cache.layers, reference_cache.layers):
        assert ours.cumulative_length.item() == theirs.cumulative_length.item() == 6
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)
    one, two = torch.zeros(1, 1, dtype=torch.long, device=DEVICE), torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        with fast_decode(model):
            in_place = model.model.writes_cache_in_place
            assert in_place(cache, one)
            assert not in_place(cache, two)  # a prefill
            assert not in_place(StaticCache(config=model.config, max_cache_len=16), one)  # not allocated yet
            model.config._attn_implementation = "eager"  # an additive mask (the kernel reads SDPA's bool one)
            assert not in_place(cache, one)
            model.config._attn_implementation = "sdpa"
        assert not isinstance(model.model, InPlaceCacheBackbone)  # kernels off
    with fast_decode(model):
        assert not model.model.writes_cache_in_place(cache, one)  # autograd on (training never sees the kernels)


@needs_triton
def test_bad_shapes_are_clear_errors():
    x = torch.randn(2, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        decode_kernels.gemv(x, torch.randn(4, 8, device=DEVICE))
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    kv = torch.randn(1, 2, 10, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one query"):
        decode_kernels.decode_attention(q, kv, kv, torch.ones(1, 1, 2, 10, dtype=torch.bool, device=DEVICE), 1.0)
    cos = torch.ones(1, 1, 1, 8, device=DEVICE)
    one_q, new_kv = q[:, :, :1].transpose(1, 2), kv[:, :, :1].transpose(1, 2)  # (1, 1, H, D), (1, 1, Hkv, D)
    mask, slot = torch.ones(1, 1, 1, 10, dtype=torch.bool, device=DEVICE), torch.tensor(0, device=DEVICE)
    other_heads = torch.zeros(1, 3, 10, 16, device=DEVICE)
    transposed = torch.zeros(1, 2, 16, 10, device=DEVICE).transpose(2, 3)  # a write would land in a copy
    for keys, values in ((other_heads, other_heads), (transposed, kv.clone())):
        with pytest.raises(ValueError, match="one token per row"):
            decode_kernels.decode_attention_in_place(one_q, new_kv, new_kv, cos, cos, keys, values, slot, mask, 1e-6,
                                                     1.0, 1.0)  # fmt: skip


@needs_triton
@pytest.mark.parametrize("options", [{}, ALL_2026, {"hidden_size": 96}], ids=["seed", "2026", "head24"])
def test_engine_with_decode_kernels_equals_engine_without(options):
    """Batch 1 runs whole blocks through the kernels (norms folded into the GEMVs; 2026 value-embedding layers keep
    their norm), a batch of two only the attention; both must make the tokens of the unfused model. Heads of 24
    (not a power of two) keep SDPA under the GEMVs."""
    model = random_model(tiny_config(**options)).to(DEVICE)
    prompts = [[1, 5, 9, 33, 70, 2, 8], [1, 400, 2, 3]]
    for batch in (prompts[:1], prompts):
        plain = Engine(model, None, cache_implementation="static", compile=False)
        plain._fast_decode = False
        expected = plain.generate_batch(batch, max_new_tokens=5, temperature=0.0)
        engine = Engine(model, None, cache_implementation="static", compile=False)
        assert engine.generate_batch(batch, max_new_tokens=5, temperature=0.0) == expected
    with fast_decode(model):
        assert all(isinstance(layer, KernelBlock) for layer in model.model.layers) and isinstance(model, GemvHead)
        power_of_two = model.config.head_dim in (16, 128)
        assert all(isinstance(layer.self_attn, KernelAttention) == power_of_two for layer in model.model.layers)
    assert not any(isinstance(layer, KernelBlock) for layer in model.model.layers)
    assert type(model) is HFNanoChatForCausalLM
    # logits of one step agree with the unfused forward to fp32 rounding
    ids, step = torch.tensor([prompts[0]], device=DEVICE), torch.tensor([[7]], device=DEVICE)

    def next_logits():
        prefill = model(ids, use_cache=True)
        cache = getattr(prefill, "cache", None) or prefill.past_key_values  # renamed during transformers 5.x
        return model(step, cache=cache, use_cache=True).logits

    with torch.no_grad():
        reference = next_logits()
        with fast_decode(model):
            fused = next_logits()
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


@needs_triton
def test_fast_decode_under_autocast_keeps_fp32_weights_out_of_the_gemvs():
    """Autocast makes the activations bf16 over fp32 weights: the blocks and the head fall back to the unfused ops
    (which autocast casts), the attention kernel takes the bf16 q/k/v; the step must still run and agree."""
    model = random_model(tiny_config()).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        reference = next_token_logits(model, [1, 5, 9, 33, 70], 7)
        with fast_decode(model):
            fused = next_token_logits(model, [1, 5, 9, 33, 70], 7)
    torch.testing.assert_close(fused, reference, atol=0.1, rtol=0.02)


def test_fast_decode_without_triton_device_keeps_the_unfused_path():
    if torch.cuda.is_available() or INTERPRETED:
        pytest.skip("this checks machines where the kernels cannot run; here they run (CUDA or TRITON_INTERPRET=1)")
    model = random_model(tiny_config())
    with fast_decode(model):
        assert type(model.model.layers[0].self_attn) is FusedQKVAttention
        assert not isinstance(model.model.layers[0], KernelBlock) and not isinstance(model, GemvHead)


@pytest.mark.skipif(decode_kernels.triton is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED, reason="the kernel tests run directly here")
def test_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" in r.stdout  # the kernel tests ran; only this one skipped itself
