"""An independent re-implementation of nanochat's GPT forward, written from the reference docs, on nanochat's own
state-dict layout (`transformer.h.{i}.attn.c_q.weight`, ...). Tests compare our model and converters against it.

Deliberately plain: explicit loops, an explicit causal/window mask, no transformers imports.
"""

import math

import torch
import torch.nn.functional as F


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # eps=None: the dtype's machine epsilon, as nanochat


def rotary(x, base, positions):
    # x: (B, T, H, hd). nanochat: y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos over split halves.
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(positions.float(), inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def nanochat_forward(
    sd, cfg, idx, *, rope_base=10000.0, window_pattern="L", qk_scale=1.0, softcap=15.0, short_window=None
):
    """Logits (B, T, vocab) in fp32. `cfg` has nanochat's model_config keys."""
    B, T = idx.shape
    L, H, Hkv, d, V = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"], cfg["vocab_size"]
    hd = d // H
    seq = cfg["sequence_len"]
    pattern = [window_pattern[i % len(window_pattern)] for i in range(L)]
    pattern[-1] = "L"
    short = -(-seq // 4 // 128) * 128 if short_window is None else short_window
    x = norm(F.embedding(idx, sd["transformer.wte.weight"]))
    if "smear_gate.weight" in sd:
        gate = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].T)
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0 = x
    pos = torch.arange(T)
    x_back = None
    for i in range(L):
        p = f"transformer.h.{i}."
        if "resid_lambdas" in sd:
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = norm(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, hd)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, Hkv, hd)
        if f"value_embeds.{i}.weight" in sd:
            ve = F.embedding(idx, sd[f"value_embeds.{i}.weight"]).view(B, T, Hkv, hd)
            gate = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + gate.unsqueeze(-1) * ve
        q, k = norm(rotary(q, rope_base, pos)), norm(rotary(k, rope_base, pos))
        q, k = q * qk_scale, k * qk_scale
        rep = H // Hkv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = ki <= qi
        if pattern[i] == "S":
            allowed &= ki >= qi - short
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, d)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        h = norm(x)
        x = x + F.relu(h @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if i == L // 2:
            x_back = x
    if "backout_lambda" in sd:
        x = x - sd["backout_lambda"] * x_back
    logits = (norm(x) @ sd["lm_head.weight"].T)[..., :V].float()
    return softcap * torch.tanh(logits / softcap)


def random_nanochat_state_dict(cfg, *, head_2026=False, padded_vocab=None, seed=0):
    """Random weights in nanochat's layout (all non-zero so every path matters)."""
    g = torch.Generator().manual_seed(seed)
    L, H, Hkv, d, V = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"], cfg["vocab_size"]
    hd = d // H
    Vp = padded_vocab or V

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    sd = {"transformer.wte.weight": r(Vp, d, s=1.0), "lm_head.weight": r(Vp, d, s=0.1)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_q.weight"] = r(H * hd, d) / math.sqrt(d) * 3
        sd[p + "attn.c_k.weight"] = r(Hkv * hd, d) / math.sqrt(d) * 3
        sd[p + "attn.c_v.weight"] = r(Hkv * hd, d) / math.sqrt(d) * 3
        sd[p + "attn.c_proj.weight"] = r(d, d) / math.sqrt(d) * 3
        sd[p + "mlp.c_fc.weight"] = r(4 * d, d) / math.sqrt(d) * 3
        sd[p + "mlp.c_proj.weight"] = r(d, 4 * d) / math.sqrt(4 * d) * 3
        if head_2026 and i % 2 == (L - 1) % 2:
            sd[p + "attn.ve_gate.weight"] = r(Hkv, 12)
            sd[f"value_embeds.{i}.weight"] = r(Vp, Hkv * hd)
    if head_2026:
        sd["resid_lambdas"] = 1.15 - 0.1 * torch.arange(L) / max(L - 1, 1)
        sd["x0_lambdas"] = 0.2 - 0.15 * torch.arange(L) / max(L - 1, 1)
        sd["smear_gate.weight"] = r(1, 24)
        sd["smear_lambda"] = torch.tensor([0.3])
        sd["backout_lambda"] = torch.tensor([0.2])
    return sd
