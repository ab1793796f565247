"""Triton kernels for decoding one token at a time: a GEMV with nanochat's RMSNorm, ReLU² and the residual add
fused in, and a split-KV ("flash decoding") attention for one query over a static cache.

Why our own: at batch 1 a decode step reads every weight once and does almost nothing else, so its speed is the
fraction of HBM bandwidth its kernels reach. Measured on a d20 step (docs/benchmarks-log.md): cuBLAS reaches ~40% of the
bandwidth on these one-row GEMMs, cuDNN's attention spends ~7 us a layer on a few MB of cache, and a step runs ~300
kernels, a third of them norms and adds of one row; Inductor's own reductions and Triton GEMM templates, tried in
their place, were slower. These kernels read each weight row once, fold the norm into the GEMV that consumes it
(each program recomputes the row's RMS from the input, which is in cache) and split the cache across many programs.

Over a static cache the attention kernel also does what sits between the q/k/v GEMV and the attention: RoPE,
QK-norm and the write of the new k and v into the cache. Its programs merge their chunks themselves (the last one of
a head to finish), so a layer's attention is one launch where Inductor and the unfused ops made five.

On Hopper and newer the kernels launch with programmatic dependent launch (PDL): a kernel starts while the one before
it finishes, reads only what no kernel of the step writes (a GEMV's weights, when one block covers the row), and then
waits for its predecessor's results (`gdc_wait`) before it reads anything else or writes anything. With PDL the
GEMVs take one block over the whole row, so all their weight reads come before the wait: d20 batch-1 decode on one
H200 went from ~1,535 tok/s (512-wide blocks, a separate rotary kernel and merge) to ~1,710 (docs/benchmarks-log.md).
Each kernel is a `torch.library.custom_op`, so `torch.compile` keeps it inside its graph and CUDA graph; not a
`triton_op`, whose kernels Inductor launches itself, without PDL.

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


def _gemv_config(n: int, k: int, pdl: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (n x k) weight, from sweeps on an H200 (bench/decode_kernels.py).

    With PDL, one block over the whole row (up to 8K wide): each program reads its weights before it waits for the
    kernel before it, so the read overlaps that kernel (d20: q/k/v 5.0 -> 3.2 us, fc1 6.3 -> 4.2, fc2 6.1 -> 5.1).
    Without PDL, a whole row per loop step when n is small (few programs, each with many loads in flight). A large
    head keeps narrow blocks either way: its 16K+ programs cannot all be resident to read ahead."""
    if n >= 16384:
        block_n, block_k, warps = 2, 256, 1
    elif pdl and k <= 8192:
        block_k = max(triton.next_power_of_2(k), 16)
        block_n, warps = min(max(8192 // block_k, 1), 16), 1
    elif n <= 2048:
        block_n, block_k, warps = 2, 2048, 2
    else:
        block_n, block_k, warps = 8, 512, 2
    return block_n, min(block_k, triton.next_power_of_2(k)), warps


def _attention_config(slots: int) -> tuple[int, int, int]:
    """(CHUNK, BLOCK_S, num_warps): cache slots per program, per loop step, warps. 64-slot chunks were the best of a
    sweep on an H200 (bench/decode_kernels.py) at 768 slots, batch 1 and 32, and in the model (32- and 128-slot
    chunks, or 4 warps, made fewer tokens per second); caches longer than 4,096 slots get longer chunks, so that the
    merging program reads at most 64."""
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
            # several blocks along K (no PDL, or the head): the loop, after the wait. Peeling its first 512-wide
            # block off to read it before the wait made the q/k/v and fc1 GEMVs 2x slower (docs/benchmarks-log.md);
            # with PDL they take one block over the whole row instead (`_gemv_config`).
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
        pdl = _launch_dependents_early(x.device)
        block_n, block_k, warps = _gemv_config(n, k, pdl)
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
    def _rotate_and_norm(src, half, cos, sin, eps, scale, SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, DTYPE):
        """nanochat's RoPE (apply_rotary) then its RMSNorm (then the qk scale) of one head as projected: the two
        halves in fp32, rounded to DTYPE where the unfused ops round (Inductor computes them so when it fuses them)."""
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
        y1 = x1 * cos + x2 * sin
        y2 = x2 * cos - x1 * sin
        # the cast keeps fp32 math if a launcher passes a Python float as fp64 (Inductor's launcher does)
        inv_rms = 1.0 / tl.sqrt((tl.sum(y1 * y1, axis=0) + tl.sum(y2 * y2, axis=0)) / HEAD_DIM
                                + tl.cast(eps, tl.float32))  # fmt: skip
        y1 = (y1 * inv_rms).to(DTYPE)
        y2 = (y2 * inv_rms).to(DTYPE)
        if SCALE:
            y1 = (y1.to(tl.float32) * tl.cast(scale, tl.float32)).to(DTYPE)
            y2 = (y2.to(tl.float32) * tl.cast(scale, tl.float32)).to(DTYPE)
        return y1, y2

    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, arrivals_ptr, out_ptr,
        new_k_ptr, new_v_ptr, cos_ptr, sin_ptr, slot_ptr,
        S, H, GROUPS, scaling, eps, qk_scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, stride_ms,
        stride_new_kb, stride_new_kh, stride_new_vb, stride_new_vh, stride_cos_b, stride_sin_b,
        CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
        NEW_TOKEN: tl.constexpr, SCALE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One query head of one row over one chunk of the cache (split-KV, "flash decoding"): the chunk's softmax
        statistics (max, sum, weighted values); the last program of the head to finish merges all chunks into
        the output row.

        NEW_TOKEN: q and the new token's k and v come as the q/k/v GEMV wrote them. Each program applies RoPE and
        QK-norm to its q and k itself, the programs of the chunk that holds the slot `slot_ptr` points at (the
        layer's length) attend to the new key and value from registers, and one of them writes them there."""
        if PDL:  # everything this kernel reads was written by earlier kernels of the step: wait for them first
            gdc_launch_dependents()
            gdc_wait()
        bh, split = tl.program_id(0), tl.program_id(1)
        n_splits = tl.num_programs(1)
        b, h = bh // H, bh % H
        kv_h = h // GROUPS
        half = tl.arange(0, HEAD_DIM // 2)
        dims = tl.arange(0, HEAD_DIM)
        k_head = k_ptr + b * stride_kb + kv_h * stride_kh
        v_head = v_ptr + b * stride_vb + kv_h * stride_vh
        # q and keys in halves (RoPE's split): the dot product is the sum over both
        if NEW_TOKEN:
            cos = tl.load(cos_ptr + b * stride_cos_b + half).to(tl.float32)
            sin = tl.load(sin_ptr + b * stride_sin_b + half).to(tl.float32)
            dtype = q_ptr.dtype.element_ty
            q1, q2 = _rotate_and_norm(q_ptr + b * stride_qb + h * stride_qh, half, cos, sin, eps, qk_scale, SCALE,
                                      HEAD_DIM, dtype)  # fmt: skip
            new_k1, new_k2 = _rotate_and_norm(new_k_ptr + b * stride_new_kb + kv_h * stride_new_kh, half, cos, sin,
                                              eps, qk_scale, SCALE, HEAD_DIM, dtype)  # fmt: skip
            new_v = tl.load(new_v_ptr + b * stride_new_vb + kv_h * stride_new_vh + dims)
            slot = tl.load(slot_ptr).to(tl.int32)
            # one program per kv head writes the new token into the cache; never past it (index_copy_ would raise)
            writer = (split == slot // CHUNK) & (h % GROUPS == 0) & (slot < S)
            tl.store(k_head + slot * stride_ks + half, new_k1, mask=half < tl.where(writer, HEAD_DIM // 2, 0))
            tl.store(k_head + slot * stride_ks + HEAD_DIM // 2 + half, new_k2,
                     mask=half < tl.where(writer, HEAD_DIM // 2, 0))  # fmt: skip
            tl.store(v_head + slot * stride_vs + dims, new_v, mask=dims < tl.where(writer, HEAD_DIM, 0))
            new_k1, new_k2, new_v = new_k1.to(tl.float32), new_k2.to(tl.float32), new_v.to(tl.float32)
        else:
            q1 = tl.load(q_ptr + b * stride_qb + h * stride_qh + half)
            q2 = tl.load(q_ptr + b * stride_qb + h * stride_qh + HEAD_DIM // 2 + half)
            slot = -1
        q1 = q1.to(tl.float32) * tl.cast(scaling, tl.float32)
        q2 = q2.to(tl.float32) * tl.cast(scaling, tl.float32)
        m_i = tl.full([1], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for s0 in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            keep = tl.load(mask_ptr + b * stride_mb + slots * stride_ms, mask=slots < S, other=0) != 0
            # the new token's slot is read from registers: another program may be writing it right now
            fresh = slots == slot
            cached = (keep & ~fresh)[:, None]
            k1 = tl.load(k_head + slots[:, None] * stride_ks + half[None, :], mask=cached, other=0.0).to(tl.float32)
            k2 = tl.load(k_head + slots[:, None] * stride_ks + HEAD_DIM // 2 + half[None, :], mask=cached,
                         other=0.0).to(tl.float32)  # fmt: skip
            if NEW_TOKEN:
                k1 = tl.where(fresh[:, None], new_k1[None, :], k1)
                k2 = tl.where(fresh[:, None], new_k2[None, :], k2)
            scores = tl.sum(k1 * q1[None, :], axis=1) + tl.sum(k2 * q2[None, :], axis=1)
            scores = tl.where(keep, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk with nothing to attend to yet
            p = tl.exp(scores - m_safe)
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(v_head + slots[:, None] * stride_vs + dims[None, :], mask=cached, other=0.0).to(tl.float32)
            if NEW_TOKEN:
                v = tl.where(fresh[:, None], new_v[None, :], v)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        tl.store(m_ptr + bh * n_splits + split + tl.arange(0, 1), m_i)
        tl.store(l_ptr + bh * n_splits + split + tl.arange(0, 1), l_i)
        tl.store(acc_ptr + (bh * n_splits + split) * HEAD_DIM + dims, acc)
        # The merge, in the program that finishes last, instead of a kernel of its own (a launch and ~1.5 us a
        # layer at batch 1). Every thread's stores are issued before the barrier; the counter's atomic add
        # (acquire-release, GPU scope) publishes them to the program that sees the count reach n_splits, which then
        # reads them through L2 (.cg), and resets the counter for the next launch.
        tl.debug_barrier()
        if tl.atomic_add(arrivals_ptr + bh, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
            splits = tl.arange(0, BLOCK_SPLITS)
            ok = splits < n_splits
            m = tl.load(m_ptr + bh * n_splits + splits, mask=ok, other=float("-inf"), cache_modifier=".cg")
            m_max = tl.max(m, axis=0)
            m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no chunk had a slot to attend to
            weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
            sums = tl.load(l_ptr + bh * n_splits + splits, mask=ok, other=0.0, cache_modifier=".cg")
            total = tl.sum(sums * weight, axis=0)
            accs = tl.load(acc_ptr + (bh * n_splits + splits[:, None]) * HEAD_DIM + dims[None, :], mask=ok[:, None],
                           other=0.0, cache_modifier=".cg")  # fmt: skip
            out = tl.sum(accs * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
            tl.store(out_ptr + bh * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(arrivals_ptr + bh, 0, sem="relaxed", scope="gpu")

    _ARRIVALS: dict[torch.device, torch.Tensor] = {}

    def _arrivals(device: torch.device) -> torch.Tensor:
        """Per query head (of all rows), how many of its chunks' programs have finished: zero between launches (the
        merging program resets its head's count). One buffer per device, shared by every launch there: launches on
        one stream follow each other (two streams running the attention at once on one device would race on it).
        Sized for 64K query heads a launch; made by `prepare` or at the first eager call."""
        buffer = _ARRIVALS.get(device)
        if buffer is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # a zero-fill recorded into a graph would not run before the graph replays
                raise RuntimeError("call decode_kernels.prepare(device) before capturing a CUDA graph")
            buffer = _ARRIVALS[device] = torch.zeros(1 << 16, dtype=torch.int32, device=device)
        return buffer

    def _launch_attention(query, key, value, mask, scaling, new=None, config=None, pdl=None):
        """Shared by both ops: `new` = (k, v, cos, sin, slot, eps, qk_scale) for a token still to rotate and write.
        `config` (CHUNK, BLOCK_S, num_warps) and `pdl` override the defaults (bench/decode_kernels.py sweeps them)."""
        B, H, D = query.shape[0], query.shape[2] if new is not None else query.shape[1], query.shape[-1]
        S = key.shape[2]
        arrivals = _arrivals(query.device)
        if B * H > arrivals.numel():
            raise ValueError(f"decode attention handles at most {arrivals.numel()} query heads per launch, got {B} "
                             f"rows x {H} heads")  # fmt: skip
        chunk, block_s, warps = config or _attention_config(S)
        n_splits = triton.cdiv(S, chunk)
        m = torch.empty(B * H, n_splits, dtype=torch.float32, device=query.device)
        l_sum = torch.empty_like(m)
        acc = torch.empty(B * H, n_splits, D, dtype=torch.float32, device=query.device)
        out = torch.empty(B, 1, H, D, dtype=query.dtype, device=query.device)
        if new is None:  # query (B, H, 1, D)
            new_k = new_v = cos = sin = slot = query
            eps, qk_scale, q_strides, new_strides = 0.0, 1.0, (query.stride(0), query.stride(1)), (0,) * 6
        else:  # query (B, 1, H, D) as projected, k and v (B, 1, Hkv, D)
            new_k, new_v, cos, sin, slot, eps, qk_scale = new
            q_strides = (query.stride(0), query.stride(2))
            new_strides = (new_k.stride(0), new_k.stride(2), new_v.stride(0), new_v.stride(2), cos.stride(0),
                           sin.stride(0))  # fmt: skip
        pdl = _launch_dependents_early(query.device) if pdl is None else pdl
        _attention_kernel[(B * H, n_splits)](
            query, key, value, mask, m, l_sum, acc, arrivals, out,
            new_k, new_v, cos, sin, slot,
            S, H, H // key.shape[1], scaling, eps, qk_scale,
            *q_strides, key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(-1), *new_strides,
            CHUNK=chunk, BLOCK_S=block_s, HEAD_DIM=D, BLOCK_SPLITS=triton.next_power_of_2(n_splits),
            NEW_TOKEN=new is not None, SCALE=qk_scale != 1.0, PDL=pdl, num_warps=warps, launch_pdl=pdl,
        )  # fmt: skip
        return out

    @torch.library.custom_op("hfnanochat::decode_attention", mutates_args=())
    def _decode_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        return _launch_attention(query, key, value, mask, scaling)

    @_decode_attention.register_fake
    def _(query, key, value, mask, scaling):
        B, H, _, D = query.shape
        return query.new_empty(B, 1, H, D)

    @torch.library.custom_op("hfnanochat::decode_attention_in_place", mutates_args=("keys", "values"))
    def _decode_attention_in_place(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor,
        eps: float, qk_scale: float, scaling: float,
    ) -> torch.Tensor:  # fmt: skip
        return _launch_attention(q, keys, values, mask, scaling, new=(k, v, cos, sin, slot, eps, qk_scale))

    @_decode_attention_in_place.register_fake
    def _(q, k, v, cos, sin, keys, values, slot, mask, eps, qk_scale, scaling):
        return q.new_empty(q.shape)


def prepare(device: torch.device | str) -> None:
    """Allocate what the kernels keep between launches on `device` (the attention's merge counters). Call it before
    `torch.compile` runs a model with the kernels (`fast_decode` does): cudagraph trees warm a graph up inside its
    memory pool and refuse a tensor allocated there that is not an output of the graph."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if triton is not None and available(torch.empty(0, device=device)):
        _arrivals(device)


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


def _rows_of(mask: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """The last query row of an SDPA-style mask, (B, S) over the cache's S slots, strides as they come."""
    return mask[..., -1, :S].expand(B, 1, S)[:, 0]


def _unit_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels index heads and rows by strides but read the last dimension contiguously."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


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
    query, key, value = _unit_stride(query, key, value)
    return _decode_attention(query, key, value, _rows_of(mask, B, key.shape[2]), float(scaling))


def decode_attention_in_place(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    qk_scale: float,
    scaling: float,
) -> torch.Tensor:
    """A decode step's attention from the q/k/v GEMV's output to the output o_proj reads, over a static cache:
    nanochat's RoPE then RMSNorm (then `qk_scale`) on q and k, k and v written into the cache at position `slot`,
    and `decode_attention` of q over the cache with the new token in it. One kernel where Inductor made four (rotary
    and norm, the cache write, the length bump) and the attention two.

    q (B, 1, H, D), k and v (B, 1, Hkv, D) as the projection makes them (strided views are fine); cos, sin
    (B, 1, 1, D/2) or one row shared by all; keys, values (B, Hkv, S, D), written in place; slot a one-element
    integer tensor on the device (a StaticLayer's `cumulative_length`, read when the kernel runs, so a CUDA graph
    replays it at every step; the caller moves it on: the model does it once for all layers); mask as for
    `decode_attention`, True at `slot`. A slot past the cache writes nothing. Returns (B, 1, H, D)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if (
        T != 1 or D & (D - 1) or D < 2 or Hkv == 0 or H % Hkv or k.shape != (B, 1, Hkv, D) or v.shape != k.shape
        or keys.shape[:2] != (B, Hkv) or keys.shape[3] != D or values.shape != keys.shape
        or cos.shape != sin.shape or cos.shape[-1] * 2 != D or cos.numel() * 2 != cos.shape[0] * D
        or cos.shape[0] not in (1, B) or slot.numel() != 1 or slot.dtype.is_floating_point
        or mask.dtype != torch.bool or keys.stride(-1) != 1 or values.stride(-1) != 1  # written in place
    ):  # fmt: skip
        raise ValueError(
            f"decode_attention_in_place takes one token per row, power-of-two heads, a cache of matching shape (rows "
            f"contiguous) and a bool mask: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos "
            f"{tuple(cos.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}, slot {tuple(slot.shape)} "
            f"{slot.dtype}, mask {mask.dtype}"
        )
    q, k, v = _unit_stride(q, k, v)
    # one row of cos/sin per row of q (a batch of rows at the same position may share one)
    cos, sin = (t.reshape(t.shape[0], D // 2).contiguous().expand(B, D // 2) for t in (cos, sin))
    return _decode_attention_in_place(q, k, v, cos, sin, keys, values, slot, _rows_of(mask, B, keys.shape[2]),
                                      float(eps), float(qk_scale), float(scaling))  # fmt: skip


__all__ = ["available", "decode_attention", "decode_attention_in_place", "gemv", "prepare"]
