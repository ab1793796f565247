"""Fast decoding for a loaded hfnanochat model, applied for the length of a generation:

    with fast_decode(model):
        logits = model(input_ids=next_token, cache=static_cache, ...).logits   # one token per row

Decoding a token reads every weight once and runs hundreds of small kernels, so two things change inside the
context, both only with autograd off (training and gradients always see the model's own path):

- each attention layer computes q, k and v with one GEMM over the three weights stacked (at batch 1 three small
  GEMMs cost nearly three times one of their combined size, docs/benchmarks-log.md);
- where Triton runs (CUDA, or the interpreter), a step of one token goes through `decode_kernels`: GEMVs with the
  RMSNorms, ReLU² and residual adds fused in, and a split-KV attention over the cache. Over a StaticCache of plain
  StaticLayers, each layer's attention kernel also applies RoPE and QK-norm to the new key and value and writes them
  into the cache, and the backbone moves all layers' lengths on together after the last layer (StaticLayer.update
  would launch three kernels a layer; at batch 1 each costs ~1-2 us, as much as a small GEMV's weight read).

How: the modules involved change class for the length of the context, to a subclass of their own class with the
fast `forward` (the way `torch.compile` and CUDA graphs see a plain module, with no hooks). Leaving the context
restores the classes. The modeling file that travels with a checkpoint has no trace of any of this: a model loaded
with `trust_remote_code` in a process without hfnanochat runs its ordinary forward, and so does generation outside
this context. Layers whose projections are not plain `nn.Linear` (PEFT adapters, quantised layers) keep their own
forward.

The stacked q/k/v weight is a non-persistent buffer of the attention module, restacked from the current weights at
every entry, in place when the layout is unchanged: a weight update between two generations (RL) is never stale,
and a recorded CUDA graph keeps reading the same buffer.
"""

import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import Cache, StaticLayer

from ..modeling_hfnanochat import (
    HFNanoChatAttention,
    HFNanoChatDecoderLayer,
    HFNanoChatForCausalLM,
    HFNanoChatModel,
    HFNanoChatPreTrainedModel,
    rms_norm,
)
from . import decode_kernels


def _one_token(x: torch.Tensor) -> bool:
    return x.shape[:-1].numel() == 1 and not torch.is_grad_enabled()


class FusedQKVAttention(HFNanoChatAttention):
    """q, k and v from one GEMM over `qkv_weight` (the three projections stacked), without autograd."""

    use_kernels = False

    def forward(
        self,
        hidden_states,
        position_embeddings,
        attention_mask,
        value_embedding=None,
        cache=None,
        cache_in_place=False,
        **kwargs,
    ):
        if torch.is_grad_enabled():
            return super().forward(hidden_states, position_embeddings, attention_mask, value_embedding, cache, **kwargs)
        q, k, v = F.linear(hidden_states, self.qkv_weight).split(self.qkv_sizes, dim=-1)
        out = self.fast_attend(
            q,
            k,
            v,
            hidden_states,
            position_embeddings,
            attention_mask,
            value_embedding,
            cache,
            cache_in_place,
            **kwargs,
        )
        return self.o_proj(out), None  # no attention weights: generation does not record them

    def fast_attend(
        self, q, k, v, gate_input, position_embeddings, attention_mask, value_embedding, cache, cache_in_place, **kwargs
    ):
        """Projected q, k, v (B, T, features) -> (B, T, H * hd), through the decode kernels where they apply."""
        q, k, v = self.split_heads(q, k, v, gate_input, value_embedding)
        B, T = q.shape[:2]
        if cache_in_place:  # decided by InPlaceCacheBackbone for all layers of this step
            if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool):
                raise RuntimeError(
                    "the in-place cache write needs SDPA's bool mask; got " + type(attention_mask).__name__
                )
            layer = cache.layers[self.layer_idx]
            cos, sin = position_embeddings
            return decode_kernels.decode_attention_in_place(
                q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length, attention_mask,
                self.config.rms_norm_eps, self.config.qk_scale, self.scaling,
            ).reshape(B, T, -1)  # fmt: skip
        q, k = self.rotate_and_norm(q, k, position_embeddings)
        boolean_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
        if not (self.use_kernels and T == 1 and boolean_mask):
            return self.attend(q, k, v, attention_mask, cache, **kwargs)[0]
        # one new token over an SDPA-style mask (True = attend; it also hides a static cache's unwritten slots)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return decode_kernels.decode_attention(q, k, v, attention_mask, self.scaling).reshape(B, T, -1)


class KernelAttention(FusedQKVAttention):
    """FusedQKVAttention with the Triton attention for one-token steps (power-of-two head sizes)."""

    use_kernels = True


class KernelBlock(HFNanoChatDecoderLayer):
    """A block whose one-token step runs as five kernels: four GEMVs, each RMSNorm folded into the GEMV that reads
    it and ReLU² and the residual adds into the GEMVs that produce them, plus the attention."""

    def forward(self, hidden_states, position_embeddings, attention_mask, value_embedding=None, cache=None, **kwargs):
        attn = self.self_attn
        # under autocast the activations' dtype differs from fp32 weights: then the unfused ops
        if not (_one_token(hidden_states) and hidden_states.dtype == attn.qkv_weight.dtype):
            return super().forward(hidden_states, position_embeddings, attention_mask, value_embedding, cache, **kwargs)
        x = hidden_states
        if attn.ve_gate is None:
            gate_input, qkv = None, decode_kernels.gemv(x, attn.qkv_weight, norm_eps=self.eps)
        else:  # the value-embedding gate reads the normed input itself
            gate_input = rms_norm(x, self.eps)
            qkv = decode_kernels.gemv(gate_input, attn.qkv_weight)
        q, k, v = qkv.split(attn.qkv_sizes, dim=-1)
        cache_in_place = kwargs.pop("cache_in_place", False)
        out = attn.fast_attend(
            q, k, v, gate_input, position_embeddings, attention_mask, value_embedding, cache, cache_in_place, **kwargs
        )
        x = decode_kernels.gemv(out, attn.o_proj.weight, residual=x)
        hidden = decode_kernels.gemv(x, self.mlp.fc1.weight, norm_eps=self.eps, relu_square=True)
        return decode_kernels.gemv(hidden, self.mlp.fc2.weight, residual=x)


class InPlaceCacheBackbone(HFNanoChatModel):
    """Decides, once per step for all layers, whether the attention kernels write the cache themselves, and then
    moves every layer's length on with one `_foreach_add_` after the last layer."""

    def forward(self, input_ids=None, *args, cache=None, past_key_values=None, inputs_embeds=None, **kwargs):
        step = input_ids if input_ids is not None else inputs_embeds
        in_place = self.writes_cache_in_place(cache if cache is not None else past_key_values, step)
        if in_place:
            kwargs["cache_in_place"] = True
        out = super().forward(
            input_ids, *args, cache=cache, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        if in_place:
            # the attention layers only; a smear layer after them (smear_cache_layer) moved itself in its update
            layers = (cache if cache is not None else past_key_values).layers[: len(self.layers)]
            torch._foreach_add_([layer.cumulative_length for layer in layers], step.shape[1])
        return out

    def writes_cache_in_place(self, cache: Cache | None, step: torch.Tensor) -> bool:
        """One new token per row, no autograd, every attention layer on the kernels, SDPA (whose mask over a
        compileable cache is always a bool tensor), and a cache of plain StaticLayers (a sliding-window layer wraps
        around; an older transformers StaticLayer has no `cumulative_length` tensor to read the slot from)."""
        return (
            step.shape[1] == 1
            and not torch.is_grad_enabled()
            and self.config._attn_implementation == "sdpa"
            and isinstance(cache, Cache)
            and len(cache.layers) == len(self.layers) + (self.smear_gate is not None)
            and all(isinstance(block.self_attn, KernelAttention) for block in self.layers)
            and all(
                type(layer) is StaticLayer
                and layer.is_initialized
                and layer.keys.device == step.device
                and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                for layer in cache.layers[: len(self.layers)]
            )
        )


class GemvHead(HFNanoChatForCausalLM):
    """The head of a one-token step through the Triton GEMV."""

    def compute_logits(self, hidden_states):
        weight = self.lm_head.weight
        if _one_token(hidden_states) and hidden_states.dtype == weight.dtype:
            return self.softcap(decode_kernels.gemv(hidden_states, weight))
        return super().compute_logits(hidden_states)


_FAST_CLASSES: dict[tuple[type, type], type] = {}


def _fast_class(cls: type, fast: type) -> type:
    """`fast`'s methods over `cls`: `fast` itself for our own classes, a subclass of both (made once) for a user's
    subclass of ours."""
    if issubclass(cls, fast):
        return cls
    if cls in fast.__mro__:
        return fast
    if (cls, fast) not in _FAST_CLASSES:
        _FAST_CLASSES[cls, fast] = type(f"{fast.__name__}{cls.__name__}", (fast, cls), {})
    return _FAST_CLASSES[cls, fast]


def _plain(*modules: nn.Module) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _restack_qkv(attn: HFNanoChatAttention) -> None:
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    attn.qkv_sizes = [w.shape[0] for w in weights]
    stack = getattr(attn, "qkv_weight", None)
    if stack is not None and (stack.shape[0], stack.dtype, stack.device) == (
        sum(attn.qkv_sizes),
        weights[0].dtype,
        weights[0].device,
    ):
        torch.cat(weights, out=stack)
    else:
        attn.register_buffer("qkv_weight", torch.cat(weights), persistent=False)


def supports_fast_decode(model: nn.Module) -> bool:
    return isinstance(model, HFNanoChatPreTrainedModel)


# Per model (by id) while a fast_decode context is held on it: [contexts holding it, (module, own class) to restore]
_HELD: dict[int, list] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def fast_decode(model: HFNanoChatPreTrainedModel):
    """Inference-only fast path for `model` while the context is held; see the module docstring.

    Contexts on one model may overlap, nested or from several threads (two engines on one model, a Space's engine
    threads): the first to enter swaps the classes, the last to leave restores them. Each entry restacks q/k/v from
    the current weights."""
    if not supports_fast_decode(model):
        raise TypeError(f"fast_decode takes an hfnanochat model, not {type(model).__name__}")
    with _HELD_LOCK:
        attention = (m for m in model.modules() if isinstance(m, HFNanoChatAttention))
        fused = [m for m in attention if _plain(m.q_proj, m.k_proj, m.v_proj)]
        with torch.no_grad():
            for attn in fused:
                _restack_qkv(attn)
        held = _HELD.get(id(model))
        if held is None:
            held = _HELD[id(model)] = [0, _swap_in(model, fused)]
        held[0] += 1
    try:
        yield model
    finally:
        with _HELD_LOCK:
            held[0] -= 1
            if held[0] == 0:
                del _HELD[id(model)]
                for module, cls in held[1]:
                    module.__class__ = cls


def _swap_in(model, fused: list[HFNanoChatAttention]) -> list[tuple[nn.Module, type]]:
    """Give the modules of `model` their fast classes; return (module, its own class) for each, to restore them."""
    swaps = []
    if decode_kernels.available(next(model.parameters())):
        for device in {attn.qkv_weight.device for attn in fused}:
            decode_kernels.prepare(device)
        # the attention kernel holds a head in one power-of-two block (nanochat's heads are 128 wide)
        swaps += [(m, KernelAttention if m.head_dim & (m.head_dim - 1) == 0 else FusedQKVAttention) for m in fused]
        swaps += [
            (block, KernelBlock)
            for block in model.modules()
            if isinstance(block, HFNanoChatDecoderLayer)
            and block.self_attn in fused
            and _plain(block.self_attn.o_proj, block.mlp.fc1, block.mlp.fc2)
        ]
        swaps += [(m, InPlaceCacheBackbone) for m in model.modules() if isinstance(m, HFNanoChatModel)]
        if isinstance(model, HFNanoChatForCausalLM) and _plain(model.lm_head):
            swaps.append((model, GemvHead))
    else:
        swaps += [(m, FusedQKVAttention) for m in fused]
    previous = [(m, m.__class__) for m, _ in swaps]
    try:
        for module, fast in swaps:
            module.__class__ = _fast_class(module.__class__, fast)
    except BaseException:  # half swapped is no state to leave a model in
        for module, cls in previous:
            module.__class__ = cls
        raise
    return previous


__all__ = [
    "fast_decode",
    "supports_fast_decode",
    "FusedQKVAttention",
    "KernelAttention",
    "KernelBlock",
    "InPlaceCacheBackbone",
    "GemvHead",
]
