"""Triton kernels for decoding one token at a time: a GEMV with nanochat's RMSNorm, ReLU² and the residual add
fused in, and a split-KV ("flash decoding") attention for one query over a static cache.

Why our own: at batch 1 a decode step reads every weight once and does almost nothing else, so its speed is the
fraction of HBM bandwidth its kernels reach. Measured on a d20 step (docs/benchmarks.md): cuBLAS reaches ~40% of the
bandwidth on these one-row GEMMs, cuDNN's attention spends ~7 us a layer on a few MB of cache, and a step runs ~300
kernels, a third of them norms and adds of one row; Inductor's own reductions and Triton GEMM templates, tried in
their place, were slower. These kernels read each weight row once, fold the norm into the GEMV that consumes it
(each program recomputes the row's RMS from the input, which is in cache) and split the cache across many programs.

Both are registered with `torch.library.triton_op`, so `torch.compile` keeps them inside its graph (and its CUDA
graph). They run where Triton runs: CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1` (how the tests check them
without a GPU). `available(tensor)` says which.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: the model keeps its cuBLAS/SDPA path
    triton = None


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on this tensor's device."""
    if triton is None:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


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
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """out[n] = (residual[n] +) act(sum_k w[n, k] * norm(x)[k]) for one row x of length K."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            col_ok = k0 + cols < K
            x = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + (k0 + cols)[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)  # fmt: skip
            acc += w.to(tl.float32) * x[None, :]
            if NORM:
                squares += x * x
        dot = tl.sum(acc, axis=1)
        if NORM:
            # RMSNorm is a scale of the whole row, so it can be applied after the dot product: one pass over x and
            # the weight instead of a pass for the row's RMS first (a round trip to memory per loop step). The
            # unfused model rounds the normed row to bf16 before its GEMM; this skips that rounding. The cast:
            # under Inductor a Python float argument arrives as fp64.
            dot = dot / tl.sqrt(tl.sum(squares, axis=0) / K + tl.cast(eps, tl.float32))
        # fp32 arithmetic with the unfused ops' roundings to the activations' dtype in between
        y = dot.to(out_ptr.dtype.element_ty).to(tl.float32)
        if RELU_SQUARE:
            y = tl.maximum(y, 0.0)
            y = (y * y).to(out_ptr.dtype.element_ty).to(tl.float32)
        if RESIDUAL:
            y = tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) + y
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton_op("hfnanochat::gemv", mutates_args={})
    def _gemv(
        x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float, norm: bool, relu_square: bool
    ) -> torch.Tensor:
        n, k = weight.shape
        out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
        block_n, block_k, warps = _gemv_config(n, k)
        wrap_triton(_gemv_kernel)[(triton.cdiv(n, block_n),)](
            x, weight, out, residual if residual is not None else out, n, k, eps,
            NORM=norm, RELU_SQUARE=relu_square, RESIDUAL=residual is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )  # fmt: skip
        return out

    @triton.jit
    def _attention_partial_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
        S, H, GROUPS, scaling,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, stride_ms,
        CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        """Softmax statistics (max, sum, weighted values) of one query head over one chunk of the cache."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kv_h = h // GROUPS
        dims = tl.arange(0, HEAD_DIM)
        # the cast: under Inductor a Python float argument arrives as fp64
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
        m_ptr, l_ptr, acc_ptr, out_ptr, N_SPLITS, BLOCK_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr
    ):
        """Merge the chunks' statistics of one query head into its output row."""
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

    @triton_op("hfnanochat::decode_attention", mutates_args={})
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
        wrap_triton(_attention_partial_kernel)[(B * H, n_splits)](
            query, key, value, mask, m, l_sum, acc,
            S, H, H // key.shape[1], scaling,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(-1),
            CHUNK=chunk, BLOCK_S=block_s, HEAD_DIM=D, num_warps=warps,
        )  # fmt: skip
        wrap_triton(_attention_combine_kernel)[(B * H,)](
            m, l_sum, acc, out, n_splits, BLOCK_SPLITS=triton.next_power_of_2(n_splits), HEAD_DIM=D, num_warps=4
        )
        return out


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


__all__ = ["available", "decode_attention", "gemv"]
