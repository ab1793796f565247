"""Triton kernels for decoding one token at a time: a GEMV with nanochat's RMSNorm, ReLU² and the residual add
fused in, and a split-KV ("flash decoding") attention for one query over a static cache.

Why our own: at batch 1 a decode step reads every weight once and does almost nothing else, so its speed is the
fraction of HBM bandwidth its kernels reach. Measured on a d20 step (docs/benchmarks.md): cuBLAS reaches ~40% of the
bandwidth on these one-row GEMMs, cuDNN's attention spends ~7 us a layer on a few MB of cache, and a step runs ~300
kernels, a third of them norms and adds of one row; Inductor's own reductions and Triton GEMM templates, tried in
their place, were slower. These kernels read each weight row once, fold the norm into the GEMV that consumes it
(each program recomputes the row's RMS from the input, which is in cache) and split the cache across many programs.

A third kernel does what sits between the q/k/v GEMV and the attention: RoPE, QK-norm and the write of k and v into
a static cache, one launch where Inductor made three.

On Hopper and newer the kernels launch with programmatic dependent launch (PDL): a kernel starts while the one before
it finishes, reads only what no kernel of the step writes (a GEMV's weights, when one block covers the row), and then
waits for its predecessor's results (`gdc_wait`) before it reads anything else or writes anything. Together with the
fused cache write, a d20 step went from 751 to 678 us on an H200 (docs/benchmarks.md). Each kernel is a
`torch.library.custom_op`, so `torch.compile` keeps it inside its graph and CUDA graph; not a `triton_op`, whose
kernels Inductor launches itself, without PDL.

They run where Triton runs: CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1` (how the tests check them
without a GPU). `available(tensor)` says which.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: the model keeps its cuBLAS/SDPA path
    triton = None


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on this tensor's device."""
    if triton is None:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _launch_dependents_early(device: torch.device) -> bool:
    """Whether the kernels launch with programmatic dependent launch (PDL): Hopper or newer, not under the
    interpreter, and not switched off with HFNANOCHAT_DECODE_PDL=0 (for A/B runs, bench/decode_variants.py; read
    once per device, as every kernel call of an eager decode step asks)."""
    return (
        device.type == "cuda"
        and os.environ.get("HFNANOCHAT_DECODE_PDL", "1") != "0"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def _gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (n x k) weight, from a sweep on an H200 (bench/decode_kernels.py): a
    whole row per loop step when n is small (few programs, each with many loads in flight), narrow blocks for a
    large head."""
    if n >= 16384:
        block_n, block_k, warps = 2, 256, 1
    elif n <= 2048:
        block_n, block_k, warps = 2, 2048, 2
    else:
        block_n, block_k, warps = 8, 512, 2
    return block_n, min(block_k, triton.next_power_of_2(k)), warps


def _attention_config(slots: int) -> tuple[int, int, int]:
    """(CHUNK, BLOCK_S, num_warps): cache slots per program, per loop step, warps. 64-slot chunks were the best of a
    sweep on an H200 (bench/decode_kernels.py) at 768 slots, batch 1 and 32; caches longer than 4,096 slots get
    longer chunks, so that the combine kernel merges at most 64."""
    chunk = max(64, triton.next_power_of_2(triton.cdiv(slots, 64)))
    return chunk, 64, 2


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, out_ptr, residual_ptr, N, K, eps,
        NORM: tl.constexpr, RELU_SQUARE: tl.constexpr, RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """out[n] = (residual[n] +) act(sum_k w[n, k] * norm(x)[k]) for one row x of length K."""
        if PDL:
            gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        if ONE_BLOCK:
            # The whole row block of weights is read before waiting for the kernel before this one (PDL): weights
            # are never written during a step, so their read overlaps that kernel's tail instead of following it.
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :],
                        other=0.0)  # fmt: skip
            if PDL:
                gdc_wait()
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            acc = w.to(tl.float32) * x[None, :]
            squares = x * x
        else:
            # several blocks along K: the loop as it was before PDL, after the wait. Peeling its first block off to
            # read it before the wait made the q/k/v and fc1 GEMVs 2x slower (measured, docs/benchmarks.md).
            if PDL:
                gdc_wait()
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            squares = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                col_ok = k0 + cols < K
                x = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + rows[:, None] * K + (k0 + cols)[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
                acc += w.to(tl.float32) * x[None, :]
                if NORM:
                    squares += x * x
        dot = tl.sum(acc, axis=1)
        if NORM:
            # RMSNorm is a scale of the whole row, so it can be applied after the dot product: one pass over x and
            # the weight instead of a pass for the row's RMS first (a round trip to memory per loop step). The
            # unfused model rounds the normed row to bf16 before its GEMM; this skips that rounding. The cast keeps fp32
            # math if a launcher passes a Python float as fp64 (Inductor's launcher does).
            dot = dot / tl.sqrt(tl.sum(squares, axis=0) / K + tl.cast(eps, tl.float32))
        # fp32 arithmetic with the unfused ops' roundings to the activations' dtype in between
        y = dot.to(out_ptr.dtype.element_ty).to(tl.float32)
        if RELU_SQUARE:
            y = tl.maximum(y, 0.0)
            y = (y * y).to(out_ptr.dtype.element_ty).to(tl.float32)
        if RESIDUAL:
            y = tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) + y
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @torch.library.custom_op("hfnanochat::gemv", mutates_args=())
    def _gemv(
        x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float, norm: bool, relu_square: bool
    ) -> torch.Tensor:
        n, k = weight.shape
        out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
        block_n, block_k, warps = _gemv_config(n, k)
        pdl = _launch_dependents_early(x.device)
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, out, residual if residual is not None else out, n, k, eps,
            NORM=norm, RELU_SQUARE=relu_square, RESIDUAL=residual is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, ONE_BLOCK=k <= block_k, PDL=pdl, num_warps=warps, launch_pdl=pdl,
        )  # fmt: skip
        return out

    @_gemv.register_fake
    def _(x, weight, residual, eps, norm, relu_square):
        return x.new_empty(x.shape[:-1] + (weight.shape[0],))

    @triton.jit
    def _attention_partial_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
        S, H, GROUPS, scaling,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, stride_ms,
        CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Softmax statistics (max, sum, weighted values) of one query head over one chunk of the cache."""
        if PDL:  # everything this kernel reads was written by earlier kernels of the step: wait for them first
            gdc_launch_dependents()
            gdc_wait()
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kv_h = h // GROUPS
        dims = tl.arange(0, HEAD_DIM)
        # the cast keeps fp32 math if a launcher passes a Python float as fp64 (Inductor's launcher does)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + dims).to(tl.float32) * tl.cast(scaling, tl.float32)
        m_i = tl.full([1], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for s0 in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            keep = tl.load(mask_ptr + b * stride_mb + slots * stride_ms, mask=slots < S, other=0) != 0
            k = tl.load(k_ptr + b * stride_kb + kv_h * stride_kh + slots[:, None] * stride_ks + dims[None, :],
                        mask=keep[:, None], other=0.0)  # fmt: skip
            scores = tl.where(keep, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk with nothing to attend to yet
            p = tl.exp(scores - m_safe)
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(v_ptr + b * stride_vb + kv_h * stride_vh + slots[:, None] * stride_vs + dims[None, :],
                        mask=keep[:, None], other=0.0)  # fmt: skip
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m_i = m_new
        n_splits = tl.num_programs(1)
        tl.store(m_ptr + bh * n_splits + split + tl.arange(0, 1), m_i)
        tl.store(l_ptr + bh * n_splits + split + tl.arange(0, 1), l_i)
        tl.store(acc_ptr + (bh * n_splits + split) * HEAD_DIM + dims, acc)

    @triton.jit
    def _attention_combine_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, N_SPLITS, BLOCK_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr
    ):
        """Merge the chunks' statistics of one query head into its output row."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        bh = tl.program_id(0)
        splits = tl.arange(0, BLOCK_SPLITS)
        ok = splits < N_SPLITS
        m = tl.load(m_ptr + bh * N_SPLITS + splits, mask=ok, other=float("-inf"))
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no chunk had a slot to attend to
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        total = tl.sum(tl.load(l_ptr + bh * N_SPLITS + splits, mask=ok, other=0.0) * weight, axis=0)
        dims = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + (bh * N_SPLITS + splits[:, None]) * HEAD_DIM + dims[None, :], mask=ok[:, None],
                      other=0.0)  # fmt: skip
        out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + bh * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))

    @torch.library.custom_op("hfnanochat::decode_attention", mutates_args=())
    def _decode_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        B, H, _, D = query.shape
        S = key.shape[2]
        chunk, block_s, warps = _attention_config(S)
        n_splits = triton.cdiv(S, chunk)
        m = torch.empty(B * H, n_splits, dtype=torch.float32, device=query.device)
        l_sum = torch.empty_like(m)
        acc = torch.empty(B * H, n_splits, D, dtype=torch.float32, device=query.device)
        out = torch.empty(B, 1, H, D, dtype=query.dtype, device=query.device)
        pdl = _launch_dependents_early(query.device)
        _attention_partial_kernel[(B * H, n_splits)](
            query, key, value, mask, m, l_sum, acc,
            S, H, H // key.shape[1], scaling,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(-1),
            CHUNK=chunk, BLOCK_S=block_s, HEAD_DIM=D, PDL=pdl, num_warps=warps, launch_pdl=pdl,
        )  # fmt: skip
        _attention_combine_kernel[(B * H,)](
            m, l_sum, acc, out, n_splits, BLOCK_SPLITS=triton.next_power_of_2(n_splits), HEAD_DIM=D, PDL=pdl,
            num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
        return out

    @_decode_attention.register_fake
    def _(query, key, value, mask, scaling):
        B, H, _, D = query.shape
        return query.new_empty(B, 1, H, D)

    @triton.jit
    def _rotary_norm_cache_write_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, keys_ptr, values_ptr, slot_ptr,
        H, S, eps, scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos_b, stride_sin_b,
        stride_keys_b, stride_keys_h, stride_keys_s, stride_values_b, stride_values_h, stride_values_s,
        SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One head of one row. A query head: RoPE, QK-norm (and the qk scale) into q_out. A kv head: the same for
        its key, written with its value into the cache at the slot read from `slot_ptr` (the layer's length)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        b, head = tl.program_id(0), tl.program_id(1)
        half = tl.arange(0, HEAD_DIM // 2)
        cos = tl.load(cos_ptr + b * stride_cos_b + half).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_sin_b + half).to(tl.float32)
        slot = tl.load(slot_ptr)
        # a key is never written past the cache (the engine sizes it; index_copy_ would raise there)
        write = half < tl.where((head < H) | (slot < S), HEAD_DIM // 2, 0)
        if head < H:
            src = q_ptr + b * stride_qb + head * stride_qh
            dst = q_out_ptr + (b * H + head) * HEAD_DIM
        else:
            src = k_ptr + b * stride_kb + (head - H) * stride_kh
            dst = keys_ptr + b * stride_keys_b + (head - H) * stride_keys_h + slot * stride_keys_s
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
        # nanochat's rotation (apply_rotary), then its RMSNorm, in fp32 with one rounding at the end, as Inductor
        # computes the unfused ops when it fuses them
        y1 = x1 * cos + x2 * sin
        y2 = x2 * cos - x1 * sin
        # the cast keeps fp32 math if a launcher passes a Python float as fp64 (Inductor's launcher does)
        inv_rms = 1.0 / tl.sqrt((tl.sum(y1 * y1, axis=0) + tl.sum(y2 * y2, axis=0)) / HEAD_DIM
                                + tl.cast(eps, tl.float32))  # fmt: skip
        y1 = (y1 * inv_rms).to(q_out_ptr.dtype.element_ty)
        y2 = (y2 * inv_rms).to(q_out_ptr.dtype.element_ty)
        if SCALE:
            y1 = (y1.to(tl.float32) * tl.cast(scale, tl.float32)).to(q_out_ptr.dtype.element_ty)
            y2 = (y2.to(tl.float32) * tl.cast(scale, tl.float32)).to(q_out_ptr.dtype.element_ty)
        tl.store(dst + half, y1, mask=write)
        tl.store(dst + HEAD_DIM // 2 + half, y2, mask=write)
        if head >= H:
            dims = tl.arange(0, HEAD_DIM)
            v = tl.load(v_ptr + b * stride_vb + (head - H) * stride_vh + dims)
            dst_v = values_ptr + b * stride_values_b + (head - H) * stride_values_h + slot * stride_values_s
            tl.store(dst_v + dims, v, mask=dims < tl.where(slot < S, HEAD_DIM, 0))

    @torch.library.custom_op("hfnanochat::rotary_norm_cache_write", mutates_args=("keys", "values"))
    def _rotary_norm_cache_write(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, eps: float, scale: float,
    ) -> torch.Tensor:  # fmt: skip
        B, _, H, D = q.shape
        out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
        pdl = _launch_dependents_early(q.device)
        _rotary_norm_cache_write_kernel[(B, H + k.shape[2])](
            q, k, v, cos, sin, out, keys, values, slot,
            H, keys.shape[2], eps, scale,
            q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2), cos.stride(0), sin.stride(0),
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            SCALE=scale != 1.0, HEAD_DIM=D, PDL=pdl, num_warps=1, launch_pdl=pdl,
        )  # fmt: skip
        return out

    @_rotary_norm_cache_write.register_fake
    def _(q, k, v, cos, sin, keys, values, slot, eps, scale):
        B, _, H, D = q.shape
        return q.new_empty(B, H, 1, D)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    norm_eps: float | None = None,
    relu_square: bool = False,
) -> torch.Tensor:
    """`F.linear(x, weight)` for a single row x (any leading shape of one element), bias-free, with optional fusions:
    `norm_eps` applies nanochat's RMSNorm to x first, `relu_square` applies ReLU² to the output, `residual` is added
    to it last: `residual + relu²(rms_norm(x) @ weight.T)`. Accumulates in fp32 and rounds the output like the
    unfused ops; the normed input is not rounded to x's dtype before the product (the unfused GEMM reads it so)."""
    if x.shape[:-1].numel() != 1 or x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(f"gemv takes one row matching the weight: x {tuple(x.shape)} {x.dtype}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}")  # fmt: skip
    if residual is not None:
        residual = residual.contiguous()
    return _gemv(x.contiguous(), weight.contiguous(), residual, float(norm_eps or 0.0), norm_eps is not None,
                 relu_square)  # fmt: skip


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of one new token per row over a cache: query (B, H, 1, D), key/value (B, Hkv, S, D) with H a multiple
    of Hkv, mask broadcastable to (B, 1, 1, S) with True where a slot may be attended. Returns (B, 1, H, D), the layout
    of transformers' attention functions. Softmax in fp32; a row with no slot to attend returns zeros."""
    B, H, T, D = query.shape
    if T != 1 or key.shape[1] == 0 or H % key.shape[1] or D & (D - 1) or mask.dtype != torch.bool:
        raise ValueError(
            f"decode_attention takes one query per row, H a multiple of Hkv, a power-of-two head size and a bool "
            f"mask: query {tuple(query.shape)}, key {tuple(key.shape)}, mask {mask.dtype}"
        )
    mask = mask[..., -1, : key.shape[2]].expand(B, 1, key.shape[2])[:, 0]  # (B, S), strides as they come
    if query.stride(-1) != 1:
        query = query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    return _decode_attention(query, key, value, mask, float(scaling))


def rotary_norm_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    eps: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """The attention's step between the q/k/v GEMV and the attention kernel, for one new token per row: nanochat's
    RoPE then RMSNorm (then `scale`) on q and k, and k and v written into a static cache at position `slot`.

    q (B, 1, H, D), k and v (B, 1, Hkv, D) as the projection makes them (strided views are fine); cos, sin
    (B, 1, 1, D/2); keys, values (B, Hkv, S, D), written in place; slot a one-element integer tensor on the device
    (a StaticLayer's `cumulative_length`, read when the kernel runs, so a CUDA graph replays it at every step).
    Returns q as (B, H, 1, D). One kernel where Inductor made three of the unfused ops (rotary+norm, the cache
    write, the bump of the layer's length; the model bumps all layers' lengths at once)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if (
        T != 1 or D % 2 or D & (D - 1) or k.shape != (B, 1, Hkv, D) or v.shape != k.shape
        or keys.shape[:2] != (B, Hkv) or keys.shape[3] != D or values.shape != keys.shape
        or cos.shape != sin.shape or cos.shape[-1] * 2 != D or cos.numel() * 2 != cos.shape[0] * D
        or cos.shape[0] not in (1, B) or slot.numel() != 1 or slot.dtype.is_floating_point
    ):  # fmt: skip
        raise ValueError(
            f"rotary_norm_cache_write takes one token per row, power-of-two heads and a cache of matching shape: q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos {tuple(cos.shape)}, keys "
            f"{tuple(keys.shape)}, values {tuple(values.shape)}, slot {tuple(slot.shape)} {slot.dtype}"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # one row of cos/sin per row of q (a batch of rows at the same position may share one)
    cos, sin = (t.reshape(t.shape[0], D // 2).contiguous().expand(B, D // 2) for t in (cos, sin))
    return _rotary_norm_cache_write(q, k, v, cos, sin, keys, values, slot, float(eps), float(scale))


__all__ = ["available", "decode_attention", "gemv", "rotary_norm_cache_write"]
