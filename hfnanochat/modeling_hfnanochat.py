"""The nanochat GPT as a transformers model.

Notable (the seed, October 2025 nanochat):
- rotary embeddings (nanochat's split-half convention, rotation by -theta), no learned positions
- QK-norm applied *after* RoPE
- parameter-free RMSNorm everywhere, including right after the token embedding and before the head
- ReLU^2 MLP of 4x width, no biases anywhere, untied embedding and LM head
- multi-query / grouped-query attention via `num_key_value_heads`
- logits cast to fp32, then soft-capped at 15; the LM-head matmul runs on a vocabulary padded to a multiple of 64
Options from 2026 nanochat, each a config field and off by default: sliding-window pattern (e.g. "SSSL"), value
embeddings, per-layer residual/x0 scalars, x1.2 QK scale, smear, backout.

Integration: `GenerationMixin` with the v5 cache classes (dynamic and static), `attention_mask`/`position_ids`
(left padding, packed rows), attention dispatched through transformers' attention-interface registry (SDPA by
default), `labels` -> shifted loss with ignore index -100, `logits_to_keep`, a backbone (`self.model`) returning
`last_hidden_state` so TRL's fused LM head reproduces our loss.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_hfnanochat import HFNanoChatConfig

# transformers renamed the cache argument and output field from `past_key_values` to `cache` during 5.x; our code
# accepts both spellings and answers in the one this transformers expects.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_arg_renamed(forward):
    """Where transformers calls the cache argument `cache`, `past_key_values` warns as it does for built-in models."""
    if _CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
    return forward


def rope_position_limit(config: HFNanoChatConfig) -> int:
    """Positions the RoPE tables cover: 10x the context, nanochat's own limit."""
    return 10 * config.max_position_embeddings


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """nanochat's parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """nanochat's rotary convention: split halves, y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos.

    x: (B, T, H, hd); cos/sin: (B, T, 1, hd/2). This rotates by -theta, the transpose of the textbook form; nanochat
    keeps it for checkpoint compatibility and so do we (the stock NanoChat class flips `rotate_half` to match).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention for `attn_implementation="eager"` (tests, debugging): fp32 softmax, GQA by repetition."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class HFNanoChatRotaryEmbedding(nn.Module):
    """cos/sin of nanochat's RoPE for `position_ids` (so left padding and packing just work), (B, T, 1, head_dim/2).

    `config.rope_parameters["rope_type"]` is `"default"` (nanochat's) or any type of transformers'
    `ROPE_INIT_FUNCTIONS` (linear, dynamic, yarn, longrope, llama3, ...), whose frequencies and attention scaling
    come from transformers' own functions.

    Types whose frequencies are fixed (all but dynamic and longrope) are looked up in tables covering positions
    [0, 10 x max_position_embeddings), nanochat's own limit. They are non-persistent buffers (rebuilt by
    `_init_weights` after a meta-device load, never saved) because computing cos/sin per call is slow under
    torch.compile: Inductor folds the cos/sin of `position * inv_freq` into every q/k rotary kernel, so each of the
    (batch x seq x heads x head_dim) elements re-evaluated two transcendentals (measured: 14% of a d20 training step on
    an H200). A lookup reads a table that sits in cache instead. Same values as computing them per call: fp32 cos/sin,
    cast to the activations' dtype on use. Length-dependent types (dynamic, longrope) compute them per call, as
    transformers' models do, from `inv_freq` as `dynamic_rope_update` moves it.
    """

    def __init__(self, config: HFNanoChatConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported: use 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}"
            )
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.max_positions = rope_position_limit(config)
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.tabled = self.rope_type not in ("dynamic", "longrope")
        cos, sin = self.tables() if self.tabled else (None, None)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HFNanoChatConfig, device=None, seq_len=None, **kwargs):
        """nanochat's inverse frequencies, theta ** (-2i / head_dim); no attention scaling."""
        base = float(config.rope_parameters.get("rope_theta", 10000.0))
        dim = config.head_dim
        channels = torch.arange(0, dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (base ** (channels / dim)), 1.0

    def rope_init_fn(self, config, device=None):
        fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        return fn(config, device)

    def tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(max_positions, head_dim/2) fp32 cos and sin of position * inv_freq, times the attention scaling."""
        inv_freq = self.rope_init_fn(self.config, device)[0]
        freqs = torch.arange(self.max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin

    @dynamic_rope_update  # dynamic / longrope: moves inv_freq with the sequence length
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos, sin of shape (B, T, 1, head_dim/2) in x's dtype."""
        if self.cos_table is not None:
            cos, sin = self.cos_table[position_ids], self.sin_table[position_ids]
        else:
            freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
            cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return cos.to(x.dtype)[:, :, None, :], sin.to(x.dtype)[:, :, None, :]


def _linear(in_features: int, out_features: int, init_role: str) -> nn.Linear:
    """A bias-free Linear tagged with its initialisation role (read by `_init_weights`)."""
    layer = nn.Linear(in_features, out_features, bias=False)
    layer.init_role = init_role
    return layer


class HFNanoChatAttention(nn.Module):
    def __init__(self, config: HFNanoChatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None
        d = config.hidden_size
        self.q_proj = _linear(d, self.num_heads * self.head_dim, "matrix_in")
        self.k_proj = _linear(d, self.num_key_value_heads * self.head_dim, "matrix_in")
        self.v_proj = _linear(d, self.num_key_value_heads * self.head_dim, "matrix_in")
        self.o_proj = _linear(self.num_heads * self.head_dim, d, "matrix_out")
        # 2026 value embeddings: a per-kv-head gate read from the first 12 channels of the block input.
        self.ve_gate = _linear(12, self.num_key_value_heads, "gate") if config.has_value_embedding(layer_idx) else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        value_embedding: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (output (B, T, d), attention weights or None), the attention weights for `output_attentions`."""
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = self.split_heads(q, k, v, hidden_states, value_embedding)
        q, k = self.rotate_and_norm(q, k, position_embeddings)
        out, weights = self.attend(q, k, v, attention_mask, cache, **kwargs)
        return self.o_proj(out), weights

    def split_heads(self, q, k, v, gate_input, value_embedding):
        """Projected q, k, v (B, T, features) -> (B, T, heads, head_dim), with the 2026 value embedding added to v
        (its gate reads `gate_input`, the normed block input)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_key_value_heads, self.head_dim)
        v = v.view(B, T, self.num_key_value_heads, self.head_dim)
        if value_embedding is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(gate_input[..., :12]))  # (B, T, Hkv), in (0, 3)
            v = v + gate.unsqueeze(-1) * value_embedding.view(B, T, self.num_key_value_heads, self.head_dim)
        return q, k, v

    def rotate_and_norm(self, q, k, position_embeddings):
        """RoPE first, then QK-norm: nanochat's order (the norm keeps attention logits bounded after rotation)."""
        cos, sin = position_embeddings
        eps = self.config.rms_norm_eps
        q, k = rms_norm(apply_rotary(q, cos, sin), eps), rms_norm(apply_rotary(k, cos, sin), eps)
        if self.config.qk_scale != 1.0:
            q, k = q * self.config.qk_scale, k * self.config.qk_scale
        return q, k

    def attend(self, q, k, v, attention_mask, cache, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, heads, head_dim) q, k, v -> the cache update and the attention function registered under
        `config._attn_implementation` -> ((B, T, H * hd), what o_proj reads; the attention weights or None)."""
        B, T = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return out.reshape(B, T, -1), weights


class HFNanoChatMLP(nn.Module):
    def __init__(self, config: HFNanoChatConfig):
        super().__init__()
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, "matrix_mlp_in")
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, "matrix_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())  # ReLU^2


class HFNanoChatDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HFNanoChatConfig, layer_idx: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = HFNanoChatAttention(config, layer_idx)
        self.mlp = HFNanoChatMLP(config)

    def forward(self, hidden_states, position_embeddings, attention_mask, value_embedding=None, cache=None, **kwargs):
        attn_out, _ = self.self_attn(
            rms_norm(hidden_states, self.eps), position_embeddings, attention_mask, value_embedding, cache, **kwargs
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(rms_norm(hidden_states, self.eps))


class HFNanoChatPreTrainedModel(PreTrainedModel):
    config_class = HFNanoChatConfig
    config: HFNanoChatConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HFNanoChatDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # `output_hidden_states` / `output_attentions`: transformers' forward hooks record these modules' outputs, only
    # when asked (no cost otherwise)
    _can_record_outputs = {"hidden_states": HFNanoChatDecoderLayer, "attentions": HFNanoChatAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """nanochat's initialisation, per parameter-owning module (see `docs/architecture.md`).

        seed: Linear ~ N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))), embedding ~ N(0, 1), output projections
        and lm_head zero. 2026: q/k/v ~ U(+-sqrt(3/d)), fc1 ~ U(+-0.4 sqrt(3/d)), embedding ~ N(0, 0.8),
        lm_head ~ N(0, 0.001), projections zero. Gates, scalars and value embeddings always use the 2026 rules,
        since only 2026 models have them.
        """
        config = self.config
        d = config.hidden_size
        s = (3.0 / d) ** 0.5  # uniform bound with std 1/sqrt(d)
        seed = config.init_scheme == "seed"
        if isinstance(module, nn.Linear):
            role = getattr(module, "init_role", "matrix_in")
            fan_out, fan_in = module.weight.shape
            if role == "matrix_out":
                init.zeros_(module.weight)
            elif role == "lm_head":
                init.zeros_(module.weight) if seed else init.normal_(module.weight, std=0.001)
            elif role == "gate":
                init.uniform_(module.weight, 0.0, 0.02)
            elif seed:
                init.normal_(module.weight, std=fan_in**-0.5 * min(1.0, (fan_out / fan_in) ** 0.5))
            else:
                bound = 0.4 * s if role == "matrix_mlp_in" else s
                init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, nn.Embedding):
            if getattr(module, "init_role", "") == "value_embedding":
                init.uniform_(module.weight, -s, s)
            else:
                init.normal_(module.weight, std=1.0 if seed else 0.8)
        elif isinstance(module, HFNanoChatRotaryEmbedding):
            device = module.inv_freq.device
            inv_freq = module.rope_init_fn(module.config, device)[0]
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
            if module.cos_table is not None:
                cos, sin = module.tables(device)
                init.copy_(module.cos_table, cos)
                init.copy_(module.sin_table, sin)
        elif isinstance(module, HFNanoChatModel):
            L = config.num_hidden_layers
            ramp = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
            if module.resid_lambdas is not None:
                init.copy_(module.resid_lambdas, 1.15 - 0.10 * ramp)  # 1.15 -> 1.05 over depth
                init.copy_(module.x0_lambdas, 0.20 - 0.15 * ramp)  # 0.20 -> 0.05 over depth
            if module.smear_lambda is not None:
                init.zeros_(module.smear_lambda)  # smear starts disabled
            if module.backout_lambda is not None:
                init.constant_(module.backout_lambda, 0.2)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize, plus the 2026 value embeddings: they are per-token tables too."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        backbone = getattr(self, self.base_model_prefix, self)
        vocab = embeddings.weight.shape[0]
        for name, table in backbone.value_embeds.items():
            if table.weight.shape[0] != vocab:
                resized = self._get_resized_embeddings(table, vocab, mean_resizing=mean_resizing)
                resized.init_role = "value_embedding"
                backbone.value_embeds[name] = resized
        return embeddings


def smear_cache_layer(cache: Cache, num_layers: int):
    """The cache layer after the `num_layers` attention layers that keeps the smear option's embeddings (as its keys;
    its values are empty), added on first use: a StaticLayer of the cache's length in a static cache, else a
    DynamicLayer. Being a layer of the cache's own kind, it follows every cache operation the attention layers do."""
    layers = cache.layers
    if len(layers) > num_layers:
        return layers[num_layers]
    if getattr(cache, "layer_class_to_replicate", None) is not None:  # a cache that adds its layers lazily
        while len(layers) <= num_layers:
            layers.append(cache.layer_class_to_replicate())
    elif any(isinstance(layer, StaticLayer) for layer in layers):
        layers.append(StaticLayer(max_cache_len=max(layer.max_cache_len for layer in layers)))
    else:
        layers.append(DynamicLayer())
    return layers[num_layers]


class HFNanoChatModel(HFNanoChatPreTrainedModel):
    """The backbone: embedding -> norm -> (smear) -> blocks -> (backout) -> norm. Returns `last_hidden_state`."""

    def __init__(self, config: HFNanoChatConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HFNanoChatDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary_emb = HFNanoChatRotaryEmbedding(config)
        kv_dim = config.num_key_value_heads * config.head_dim
        self.value_embeds = nn.ModuleDict()
        for i in range(config.num_hidden_layers):
            if config.has_value_embedding(i):
                self.value_embeds[str(i)] = nn.Embedding(config.vocab_size, kv_dim)
                self.value_embeds[str(i)].init_role = "value_embedding"
        L = config.num_hidden_layers
        self.resid_lambdas = nn.Parameter(torch.ones(L)) if config.residual_scalars else None
        self.x0_lambdas = nn.Parameter(torch.zeros(L)) if config.residual_scalars else None
        self.smear_gate = _linear(24, 1, "gate") if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _smear(self, x: torch.Tensor, cache: Cache | None, attention_mask) -> torch.Tensor:
        """x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * x[t-1], nothing added where x[t-1] is padding
        or does not exist (the first token).

        With a cache, x[t-1] of a call's first token is the last embedding of the previous call: the embeddings are
        kept in the cache itself, as one more layer after the attention layers (`smear_cache_layer`), so the cache's
        own methods (beam reordering, batch repeat/select, crop, reset, a static cache's fixed buffers) carry them."""
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if cache is None:  # training: the plain shift
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))  # (B, T-1, 1)
            if mask is not None:
                gate = gate * mask[:, :-1, None].to(gate.dtype)
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :24]))  # (B, T, 1)
        B, T, _ = x.shape
        layer = smear_cache_layer(cache, self.config.num_hidden_layers)
        history, _ = layer.update(x[:, None], x.new_empty(B, 1, T, 0))  # (B, 1, slots, d)
        # slot of this call's first token: a static layer counts its writes in a tensor, a dynamic one has them all
        length = layer.cumulative_length if isinstance(layer, StaticLayer) else history.shape[2]
        prev_slot = torch.arange(T, device=x.device) + (length - T - 1)
        has_prev = prev_slot >= 0
        prev = history[:, 0].index_select(1, prev_slot.clamp(min=0)).to(x.dtype)
        keep = has_prev[None, :, None].to(gate.dtype)
        if mask is not None:
            keep = keep * mask.gather(1, prev_slot.clamp(min=0)[None].expand(B, -1))[..., None].to(gate.dtype)
        return x + gate * keep * prev

    @merge_with_config_defaults
    @capture_outputs
    @_cache_arg_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if input_ids is None and len(self.value_embeds):
            raise ValueError("value embeddings are looked up by token id: pass input_ids, not inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        device_type = inputs_embeds.device.type
        if torch.is_autocast_enabled(device_type):
            # Keep the residual stream in the compute dtype (nanochat 2026: `wte(idx).to(COMPUTE_DTYPE)`; the seed
            # stored wte in bf16). An fp32 embedding under autocast would make every residual add and norm fp32 and
            # double the activation memory.
            inputs_embeds = inputs_embeds.to(torch.get_autocast_dtype(device_type))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        # Plain causal rows (pretraining: no padding, no cache, default positions) need no mask tensor with SDPA:
        # `is_causal=True` lets it pick the flash kernel. transformers can only skip the mask itself outside
        # torch.compile (torch < 2.14), and a materialised (B, 1, T, T) mask sends SDPA to a kernel that computes
        # every block (3x slower attention at d12 in SFTTrainer on an H100). `right_padded=True` (what our SFT
        # collator sets, see hfnanochat.training.sft.RightPaddedRows) says that the mask only cuts padding off the
        # ends of the rows: under the causal mask no real token sees a pad, so the real tokens' outputs, and the loss,
        # are the same without it; only the pad positions' outputs differ.
        right_padded = kwargs.pop("right_padded", False)
        plain_causal = (
            (attention_mask is None or right_padded)
            and cache is None
            and position_ids is None
            and self.config._attn_implementation == "sdpa"
        )
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        if isinstance(attention_mask, dict):  # generate() with a static cache prepares the masks per layer type
            masks = attention_mask
        elif plain_causal and "sliding_attention" not in self.config.layer_types:
            masks = {"full_attention": None}
        else:
            mask_kwargs = dict(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
            )
            mask_kwargs[_CACHE_FIELD] = cache
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        x = rms_norm(inputs_embeds, self.config.rms_norm_eps)  # norm right after the embedding
        if self.smear_gate is not None:
            x = self._smear(x, cache, attention_mask)
        x0 = x
        backout_layer = self.config.num_hidden_layers // 2
        x_mid = None
        for i, layer in enumerate(self.layers):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            # tensors that need gradients positional: GradientCheckpointingLayer's reentrant checkpoint sees only those
            x = layer(x, position_embeddings, masks[self.config.layer_types[i]], ve, cache=cache, **kwargs)
            if i == backout_layer:
                x_mid = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda * x_mid
        x = rms_norm(x, self.config.rms_norm_eps)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache})


class FusedHeadLoss(torch.autograd.Function):
    """sum over targets != -100 of cross-entropy(softcap(hidden @ weight.T)), chunk by chunk, gradients included.

    Why our own: at d20 the training logits are 32 x 2048 x 65,536 (17 GB per fp32 copy), and the fp32 softcap plus
    the cross-entropy keep several copies alive. Each chunk's gradient is computed in the forward pass, right after
    its loss, while its logits are at hand (the idea of Liger's fused linear cross-entropy, whose kernels are
    Triton-only); the backward pass only scales them. Same FLOPs as the unfused head (no recomputation), memory of one
    chunk's logits. The softcap is in fp32, as in `compute_logits`; the vocabulary is not padded (the head GEMMs here
    are over the full 65,536 rows, already a multiple of 64 for nanochat's vocabularies).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, cap: float | None):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            raw = (h @ weight.T).float()
            capped = raw if cap is None else cap * torch.tanh(raw / cap)
            valid = t != -100
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(capped, dim=-1)
            target_logit = capped.gather(1, safe_t[:, None]).squeeze(1)
            total = total + torch.where(valid, lse - target_logit, 0.0).sum()
            # d loss / d capped = softmax - onehot (zero on ignored rows); times d capped / d raw = 1 - (capped/cap)^2
            grad = torch.exp(capped - lse[:, None])
            grad = grad.scatter_add(1, safe_t[:, None], -torch.ones_like(lse[:, None]))
            grad = grad * valid[:, None]
            if cap is not None:
                grad = grad * (1 - (capped / cap).square())
            grad = grad.to(h.dtype)
            grad_hidden[start : start + chunk_size] = grad @ weight
            grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        return grad_hidden, (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None


class HFNanoChatForCausalLM(HFNanoChatPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: HFNanoChatConfig):
        super().__init__(config)
        self.model = HFNanoChatModel(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, "lm_head")
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """lm_head on a vocabulary padded to `pad_vocab_size_to`, cropped, cast to fp32, soft-capped.

        We pad the *matmul*, not the stored weight: checkpoints stay `[vocab, d]` (loadable by stock transformers
        and by TRL's fused head, which multiplies by `lm_head.weight` directly), while the GEMM sees a multiple of 64.
        """
        weight = self.lm_head.weight
        padding = self.config.padded_vocab_size - weight.shape[0]
        if padding and hidden_states.shape[:-1].numel() < 256:
            # decoding a few tokens is bound by reading the weight; a padded copy would only add memory traffic
            padding = 0
        if padding:
            weight = F.pad(weight, (0, 0, 0, padding))
        logits = F.linear(hidden_states, weight)
        if padding:
            logits = logits[..., : self.config.vocab_size]
        return self.softcap(logits)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # softcap in fp32: tanh in bf16 loses the small differences between top logits
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

    @can_return_tuple
    @_cache_arg_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        shift_labels = kwargs.pop("shift_labels", None)  # targets already aligned with positions (pretraining)
        loss_chunk_size = kwargs.pop("loss_chunk_size", 0)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        extras = {
            "hidden_states": outputs.hidden_states,
            "attentions": outputs.attentions,
            _CACHE_FIELD: getattr(outputs, _CACHE_FIELD),
        }
        if shift_labels is None and labels is not None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        if loss_chunk_size and shift_labels is not None:
            # Training without logits: the head + softcap + cross-entropy run chunk by chunk, each chunk's gradients
            # computed right after its loss (FusedHeadLoss), so the (tokens x vocab) fp32 logits never exist all at
            # once (17 GB per copy at d20, batch 32 x 2048). Same loss and gradients as below, to float rounding.
            loss = self.chunked_loss(hidden_states, shift_labels, loss_chunk_size, kwargs.get("num_items_in_batch"))
            return CausalLMOutputWithPast(loss=loss, logits=None, **extras)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.compute_logits(hidden_states[:, keep, :])
        loss = None
        if shift_labels is not None:
            loss = self.loss_function(
                logits, None, self.config.vocab_size, shift_labels=shift_labels.contiguous(), **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **extras)

    def chunked_loss(self, hidden_states, shift_labels, chunk_size: int, num_items_in_batch=None) -> torch.Tensor:
        """Mean cross-entropy over targets != -100 without materialising the (tokens x vocab) logits; see
        `fused_head_loss`."""
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        targets = shift_labels.reshape(-1)
        weight = self.lm_head.weight
        if torch.is_autocast_enabled(hidden.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
        cap = self.config.final_logit_softcapping
        return FusedHeadLoss.apply(hidden, weight, targets, chunk_size, cap) / count

    # ------------------------------------------------------------------------------------------------------------
    # nanochat helpers: meta-device construction, FLOPs, optimizer groups

    @classmethod
    def from_config_on_device(cls, config: HFNanoChatConfig, device: str | torch.device = "cpu"):
        """nanochat's construction: build on the meta device (no memory, no init cost), materialise, then init."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.reset_weights()
        return model

    def reset_weights(self):
        """(Re-)apply nanochat's initialisation to every parameter and buffer, e.g. after `to_empty`.

        Deliberately not an override of `init_weights`: `from_pretrained` turns that one off while it builds the
        model on the meta device, which is what lets it fill the non-persistent RoPE tables after loading."""
        for module in self.modules():
            module._is_hf_initialized = False
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor._is_hf_initialized = False
        self.initialize_weights()

    def estimate_flops(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), nanochat's formula (PaLM appendix B).

        6 x (matmul parameters: everything but embedding tables and scalars) + attention 12 * H * hd * context per
        layer, where a sliding-window layer's context is its window.
        """
        seq_len = seq_len or self.config.max_position_embeddings
        m = self.model
        not_matmul = [m.embed_tokens.weight, *m.value_embeds.parameters()]
        not_matmul += [p for p in (m.resid_lambdas, m.x0_lambdas, m.smear_lambda, m.backout_lambda) if p is not None]
        excluded = {id(p) for p in not_matmul}
        matmul_params = sum(p.numel() for p in self.parameters() if id(p) not in excluded)
        c = self.config
        attention = 0
        for letter in c.layer_window_letters():
            context = min(c.resolved_short_window() + 1, seq_len) if letter == "S" else seq_len
            attention += 12 * c.num_attention_heads * c.head_dim * context
        return 6 * matmul_params + attention

    def optimizer_param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Split parameters the way nanochat optimises them: Muon for the 2-D matrices inside the blocks, AdamW for
        the embeddings, the head and the scalars."""
        m = self.model
        scalars = [p for p in (m.resid_lambdas, m.x0_lambdas, m.smear_lambda, m.backout_lambda) if p is not None]
        if m.smear_gate is not None:
            scalars.append(m.smear_gate.weight)  # 1x24: too small to be worth orthogonalising (nanochat: AdamW)
        return {
            "matrix": [p for p in m.layers.parameters()],
            "embedding": [m.embed_tokens.weight],
            "value_embedding": [p for p in m.value_embeds.parameters()],
            "lm_head": [self.lm_head.weight],
            "scalar": scalars,
        }


__all__ = ["HFNanoChatPreTrainedModel", "HFNanoChatModel", "HFNanoChatForCausalLM"]
