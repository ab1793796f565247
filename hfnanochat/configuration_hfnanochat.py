"""Configuration of the hfnanochat GPT.

Notable:
- HF field names (`hidden_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`,
  `max_position_embeddings`, `rope_parameters`, `final_logit_softcapping`), so generation, TRL's fused LM head
  (which reads the softcap from `final_logit_softcapping`) and the cache classes find what they look for.
- `model_type = "hfnanochat"`: transformers already owns `"nanochat"` for its stock port; ours adds nanochat's 2026
  options (sliding windows, value embeddings, residual scalars, smear, backout), all off by default.
- One dial: `config_for_depth(depth)` derives width, heads and head size the way nanochat's `base_train.py` does.
"""

import math

import torch
from transformers import PreTrainedConfig

# F.rms_norm(x, (d,)) with eps=None uses the dtype's machine epsilon; this is the fp32 one, which makes our logits
# equal nanochat's in fp32 (and keeps the stock NanoChat export exact, see convert.py).
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


class HFNanoChatConfig(PreTrainedConfig):
    r"""
    Configuration of [`HFNanoChatForCausalLM`]. Defaults are nanochat's October-2025 ("seed") d20 model.

    Args:
        vocab_size (`int`, defaults to 65536): number of tokens of the tokenizer (nanochat: 2**16, specials included).
        hidden_size (`int`, defaults to 1280): model width (`n_embd`), 64 x depth in nanochat.
        num_hidden_layers (`int`, defaults to 20): depth (`n_layer`).
        num_attention_heads (`int`, defaults to 10): query heads (`n_head`); head size is `hidden_size // heads`.
        num_key_value_heads (`int`, *optional*): key/value heads (`n_kv_head`); fewer than the query heads gives
            GQA/MQA. Defaults to `num_attention_heads`.
        intermediate_size (`int`, *optional*): MLP width; nanochat always uses `4 * hidden_size`.
        max_position_embeddings (`int`, defaults to 2048): training context (`sequence_len`). RoPE tables cover
            10x this many positions (nanochat's limit), so longer inputs still run; sliding windows are derived
            from this length.
        rope_parameters (`dict`, *optional*): `{"rope_type": "default", "rope_theta": 10000.0}` (seed); 2026
            nanochat uses theta 100000.
        rms_norm_eps (`float`, defaults to fp32 machine epsilon): epsilon of the parameter-free RMSNorms.
        final_logit_softcapping (`float`, defaults to 15.0): logits become `cap * tanh(logits / cap)` (in fp32).
        pad_vocab_size_to (`int`, defaults to 64): the LM-head matmul is computed on a vocabulary padded to this
            multiple (tensor-core friendly shapes); the padded logits are cropped before anyone sees them.
        window_pattern (`str`, defaults to `"L"`): 2026 sliding-window pattern tiled over layers, `L` = full
            context, `S` = a window of `short_window` tokens to the left; the last layer is always `L`.
        short_window (`int`, *optional*): left context of `S` layers; defaults to nanochat's
            `ceil(max_position_embeddings / 4 / 128) * 128` (512 at 2048).
        value_embeddings (`bool`, defaults to False): 2026 ResFormer value embeddings on alternating layers.
        residual_scalars (`bool`, defaults to False): 2026 per-layer `resid_lambdas`/`x0_lambdas` mixing the
            embedding back into every block's input.
        qk_scale (`float`, defaults to 1.0): multiplier on q and k after QK-norm (2026 nanochat: 1.2).
        smear (`bool`, defaults to False): 2026 smear gate mixing the previous token's embedding into the current.
        backout (`bool`, defaults to False): 2026 backout, subtracting a scaled mid-network residual before the
            final norm.
        init_scheme (`str`, defaults to `"seed"`): `"seed"` or `"2026"` initialisation of the shared weights.
    """

    model_type = "hfnanochat"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 1280,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 10,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        rope_parameters: dict | None = None,
        rms_norm_eps: float = FLOAT32_EPS,
        final_logit_softcapping: float | None = 15.0,
        pad_vocab_size_to: int = 64,
        window_pattern: str = "L",
        short_window: int | None = None,
        value_embeddings: bool = False,
        residual_scalars: bool = False,
        qk_scale: float = 1.0,
        smear: bool = False,
        backout: bool = False,
        init_scheme: str = "seed",
        attention_dropout: float = 0.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.rms_norm_eps = rms_norm_eps
        self.final_logit_softcapping = final_logit_softcapping
        self.pad_vocab_size_to = pad_vocab_size_to
        self.window_pattern = window_pattern.upper()
        self.short_window = short_window
        self.value_embeddings = value_embeddings
        self.residual_scalars = residual_scalars
        self.qk_scale = qk_scale
        self.smear = smear
        self.backout = backout
        self.init_scheme = init_scheme
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self._validate()
        # HF-native sliding windows: `layer_types` + `sliding_window` drive create_sliding_window_causal_mask and
        # DynamicCache(config=...). HF's window counts the query itself, nanochat's (FA3 `window_size=(left, 0)`)
        # counts only the tokens to its left, hence the +1.
        self.layer_types = [
            "sliding_attention" if letter == "S" else "full_attention" for letter in self.layer_window_letters()
        ]
        self.sliding_window = self.resolved_short_window() + 1 if "S" in self.layer_window_letters() else None
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    def _validate(self):
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        elif (self.hidden_size // self.num_attention_heads) % 2:
            problems.append(f"head size {self.hidden_size // self.num_attention_heads} must be even for RoPE")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_key_value_heads {self.num_key_value_heads} must divide num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            problems.append(f"window_pattern {self.window_pattern!r} may only contain the letters 'S' and 'L'")
        if self.init_scheme not in ("seed", "2026"):
            problems.append(f"init_scheme {self.init_scheme!r} must be 'seed' or '2026'")
        if self.pad_vocab_size_to < 1:
            problems.append(f"pad_vocab_size_to must be >= 1, got {self.pad_vocab_size_to}")
        if min(self.vocab_size, self.hidden_size, self.num_hidden_layers, self.max_position_embeddings) < 1:
            problems.append("vocab_size, hidden_size, num_hidden_layers and max_position_embeddings must be positive")
        if self.smear and self.hidden_size < 24:
            problems.append("smear reads the first 24 channels: hidden_size must be >= 24")
        if self.value_embeddings and self.hidden_size < 12:
            problems.append("value embeddings gate on the first 12 channels: hidden_size must be >= 12")
        if problems:
            raise ValueError("Invalid HFNanoChatConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_size_to) * self.pad_vocab_size_to

    def resolved_short_window(self) -> int:
        if self.short_window is not None:
            return self.short_window
        return math.ceil(self.max_position_embeddings / 4 / 128) * 128

    def layer_window_letters(self) -> str:
        """The pattern tiled over the layers, last layer forced to full context (as nanochat does)."""
        letters = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.num_hidden_layers)]
        letters[-1] = "L"
        return "".join(letters)

    def has_value_embedding(self, layer_idx: int) -> bool:
        # Alternating layers, the last one always included (nanochat's `has_ve`).
        return self.value_embeddings and layer_idx % 2 == (self.num_hidden_layers - 1) % 2

    def uses_only_seed_architecture(self) -> bool:
        """True when the stock transformers NanoChat class can represent this model exactly."""
        return (
            "S" not in self.layer_window_letters()
            and not (self.value_embeddings or self.residual_scalars or self.smear or self.backout)
            and self.qk_scale == 1.0
            and self.final_logit_softcapping is not None
            and self.intermediate_size == 4 * self.hidden_size
        )


def config_for_depth(
    depth: int = 20,
    vocab_size: int = 65536,
    max_seq_len: int = 2048,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    **overrides,
) -> HFNanoChatConfig:
    """nanochat's single complexity dial: width = 64 * depth, heads of ~128 (`base_train.py`).

    depth 20 -> 1280 wide, 10 heads, 560,988,160 parameters at vocab 65,536 (the seed's $100 model).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    width = depth * aspect_ratio
    heads = max(1, math.ceil(width / head_dim))  # ceil-div targets a head size of 128
    if width % heads:
        raise ValueError(
            f"depth {depth} gives width {width}, which {heads} heads do not divide; pick a depth whose width "
            f"{aspect_ratio}*depth is a multiple of ceil(width/{head_dim}) (e.g. an even depth)"
        )
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_seq_len,
    )
    kwargs.update(overrides)
    return HFNanoChatConfig(**kwargs)


__all__ = ["HFNanoChatConfig", "config_for_depth"]
