"""Checkpoint conversion, both directions of the bridge to nanochat.

- `hf-to-native IN OUT`: an hfnanochat folder of the seed architecture -> a folder that *stock* transformers loads as
  its built-in `NanoChatForCausalLM` (no trust_remote_code, no hfnanochat installed), so everything that supports
  transformers' NanoChat (vLLM included) can serve our models. Our weight names already are the stock ones; only the
  config changes.
- `nanochat-to-hf CKPT_DIR OUT`: an original nanochat checkpoint (`model_NNNNNN.pt` + `meta_NNNNNN.json`, October-2025
  or 2026 architecture) and its tiktoken tokenizer (`tokenizer.pkl`) -> an hfnanochat folder with equal logits.

Usage:
    python -m hfnanochat.convert hf-to-native out/final out/native
    python -m hfnanochat.convert nanochat-to-hf ~/.cache/nanochat/base_checkpoints/d20 out/d20 \
        --tokenizer-dir ~/.cache/nanochat/tokenizer
"""

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .cli import ArgumentParser, check_output, main_entry, non_negative_int
from .configuration_hfnanochat import HFNanoChatConfig
from .modeling_hfnanochat import HFNanoChatForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "token_bytes.pt")


# ----------------------------------------------------------------------------------------------------------------
# hfnanochat -> stock transformers NanoChat


def hf_to_native(in_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a stock `NanoChatForCausalLM` checkpoint for an hfnanochat folder of the seed architecture."""
    from transformers import GenerationConfig, NanoChatConfig

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    config = HFNanoChatConfig.from_pretrained(in_dir)
    if not config.uses_only_seed_architecture():
        raise ValueError(
            f"{in_dir} uses 2026 options (window_pattern={config.window_pattern!r}, value_embeddings="
            f"{config.value_embeddings}, residual_scalars={config.residual_scalars}, smear={config.smear}, "
            f"backout={config.backout}, qk_scale={config.qk_scale}) that transformers' NanoChat cannot express; "
            "load it with trust_remote_code=True instead"
        )
    state = {}
    for shard in sorted(in_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise ValueError(f"no *.safetensors weights found in {in_dir}")
    expected = {"model.embed_tokens.weight", "lm_head.weight"}
    for i in range(config.num_hidden_layers):
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.fc1",
            "mlp.fc2",
        ):
            expected.add(f"model.layers.{i}.{name}.weight")
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"unexpected weights in {in_dir}: missing {missing[:5]}, unexpected {extra[:5]}")

    eos = config.eos_token_id
    native = NanoChatConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,  # the stock default is 8192, not 4*d: always set it
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act="relu2",
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        final_logit_softcapping=config.final_logit_softcapping,
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        # The stock class turns pad_token_id into nn.Embedding(padding_idx=...), which zeroes that row's gradient.
        # Every nanochat special token is also an input, so no pad id here; generation gets it from generation_config.
        pad_token_id=None,
    )
    native.architectures = ["NanoChatForCausalLM"]
    native.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    from .training.export import replace_folder, write_manifest

    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    native.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if (in_dir / "generation_config.json").exists():
        GenerationConfig.from_pretrained(in_dir).save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (in_dir / name).exists():
            shutil.copy2(in_dir / name, tmp / name)
    write_manifest(tmp)
    replace_folder(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# original nanochat -> hfnanochat


def _latest_step(ckpt_dir: Path) -> int:
    steps = sorted(
        int(m.group(1)) for p in ckpt_dir.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name))
    )
    if not steps:
        raise ValueError(f"no model_NNNNNN.pt files in {ckpt_dir}")
    return steps[-1]


def nanochat_state_dict_to_hf(state: dict[str, torch.Tensor], config: HFNanoChatConfig) -> dict[str, torch.Tensor]:
    """Rename nanochat's keys to ours (and crop the 2026 vocabulary padding). Raises on missing or unknown keys."""
    # torch.compile'd models save keys with an `_orig_mod.` prefix; strip it (a prefix, not a character set).
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    V = config.vocab_size
    renames = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in [
            ("self_attn.q_proj", "attn.c_q"),
            ("self_attn.k_proj", "attn.c_k"),
            ("self_attn.v_proj", "attn.c_v"),
            ("self_attn.o_proj", "attn.c_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ]:
            renames[f"transformer.h.{i}.{theirs}.weight"] = f"model.layers.{i}.{ours}.weight"
        if config.has_value_embedding(i):
            renames[f"transformer.h.{i}.attn.ve_gate.weight"] = f"model.layers.{i}.self_attn.ve_gate.weight"
            renames[f"value_embeds.{i}.weight"] = f"model.value_embeds.{i}.weight"
    if config.residual_scalars:
        renames["resid_lambdas"] = "model.resid_lambdas"
        renames["x0_lambdas"] = "model.x0_lambdas"
    if config.smear:
        renames["smear_gate.weight"] = "model.smear_gate.weight"
        renames["smear_lambda"] = "model.smear_lambda"
    if config.backout:
        renames["backout_lambda"] = "model.backout_lambda"
    missing = sorted(k for k in renames if k not in state)
    unknown = sorted(k for k in state if k not in renames)
    if missing or unknown:
        raise ValueError(
            f"nanochat checkpoint does not match its config: missing keys {missing[:8]}, unknown keys {unknown[:8]}"
        )
    out = {}
    for theirs, ours in renames.items():
        tensor = state[theirs]
        if theirs in ("transformer.wte.weight", "lm_head.weight") or theirs.startswith("value_embeds."):
            tensor = tensor[:V]  # 2026 nanochat pads vocab rows to a multiple of 64; the padding is never used
        out[ours] = tensor.contiguous()
    return out


def config_from_nanochat_meta(meta: dict, state_keys: set[str], **overrides) -> HFNanoChatConfig:
    """Our config for a nanochat `meta_NNNNNN.json`; the 2026 features are detected from the state-dict keys."""
    try:
        mc = meta["model_config"]
        shape = dict(
            vocab_size=mc["vocab_size"],
            hidden_size=mc["n_embd"],
            num_hidden_layers=mc["n_layer"],
            num_attention_heads=mc["n_head"],
            num_key_value_heads=mc.get("n_kv_head", mc["n_head"]),
            max_position_embeddings=mc["sequence_len"],
        )
    except KeyError as e:
        raise ValueError(f"nanochat meta file lacks model_config field {e}") from None
    keys = {k.removeprefix("_orig_mod.") for k in state_keys}
    is_2026 = "smear_gate.weight" in keys or "resid_lambdas" in keys or any(k.startswith("value_embeds.") for k in keys)
    options = dict(
        window_pattern=mc.get("window_pattern", "L"),
        value_embeddings=any(k.startswith("value_embeds.") for k in keys),
        residual_scalars="resid_lambdas" in keys,
        smear="smear_gate.weight" in keys,
        backout="backout_lambda" in keys,
        # 2026 nanochat sharpened attention (q, k x 1.2 after QK-norm) and raised the RoPE base to 100k; neither is
        # visible in the weights, so they follow the architecture revision (override with --qk-scale/--rope-theta).
        qk_scale=1.2 if is_2026 else 1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0 if is_2026 else 10000.0},
        init_scheme="2026" if is_2026 else "seed",
    )
    options.update({k: v for k, v in overrides.items() if v is not None})
    return HFNanoChatConfig(**shape, **options)


def tiktoken_to_hf_tokenizer(encoding):
    """A transformers fast tokenizer (with our chat template) equivalent to a tiktoken `Encoding`.

    tiktoken stores byte-sequence ranks; BPE merges are recovered by re-running BPE over each token's bytes with only
    lower-ranked tokens available (the standard tiktoken -> tokenizers conversion).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    from .tokenizer import wrap_tokenizer

    ranks: dict[bytes, int] = encoding._mergeable_ranks
    byte_to_char = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    def bpe_split(token: bytes, max_rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                    best = (i, rank)
            if best is None:
                return parts
            i = best[0]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = bpe_split(token, rank)
            merges.append((to_str(left), to_str(right)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated", invert=False),
            ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = sorted(encoding._special_tokens.items(), key=lambda kv: kv[1])
    for name, idx in specials:
        if idx != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"special token {name} has id {idx}, expected the next free id")
        tok.add_special_tokens([name])
    return wrap_tokenizer(tok)


def _bytes_to_unicode() -> dict[int, str]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # GPT-2's byte -> printable character map (the one ByteLevel uses): printable latin-1 bytes map to themselves,
    # the rest to 256 + n in byte order.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, n = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    assert set(mapping.values()) == set(alphabet), "ByteLevel alphabet changed"
    return mapping


def nanochat_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> Path:
    """Convert a nanochat checkpoint directory (and optionally its tokenizer) into an hfnanochat folder."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    step = _latest_step(ckpt_dir) if step is None else step
    model_path, meta_path = ckpt_dir / f"model_{step:06d}.pt", ckpt_dir / f"meta_{step:06d}.json"
    for path in (model_path, meta_path):
        if not path.exists():
            raise ValueError(f"missing {path}")
    meta = json.loads(meta_path.read_text())
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    config = config_from_nanochat_meta(meta, set(state), **config_overrides)
    hf_state = nanochat_state_dict_to_hf(state, config)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}

    tokenizer = None
    if tokenizer_dir is not None:
        pkl = Path(tokenizer_dir) / "tokenizer.pkl"
        if not pkl.exists():
            raise ValueError(f"no tokenizer.pkl in {tokenizer_dir}")
        with open(pkl, "rb") as f:
            tokenizer = tiktoken_to_hf_tokenizer(pickle.load(f))
        if len(tokenizer) != config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the checkpoint's vocab_size is {config.vocab_size}"
            )
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id

    with torch.device("meta"):
        model = HFNanoChatForCausalLM(config)
    model.load_state_dict(hf_state, strict=True, assign=True)
    if tokenizer is None:
        model.save_pretrained(out_dir)
        return out_dir
    from .training.export import save_final

    return save_final(model, tokenizer, out_dir)


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m hfnanochat.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    native = sub.add_parser("hf-to-native", help="hfnanochat folder -> stock transformers NanoChatForCausalLM folder")
    native.add_argument("in_dir")
    native.add_argument("out_dir")
    native.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds files")
    imp = sub.add_parser("nanochat-to-hf", help="nanochat checkpoint dir -> hfnanochat folder")
    imp.add_argument("ckpt_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds files")
    imp.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step (None: the latest)")
    imp.add_argument("--tokenizer-dir", default=None, help="nanochat tokenizer dir holding tokenizer.pkl")
    imp.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="cast weights (None: keep)")
    imp.add_argument("--qk-scale", type=float, default=None, help="override the detected q/k scale")
    imp.add_argument("--rope-theta", type=float, default=None, help="override the detected RoPE base")
    args = parser.parse_args(argv)
    # the new folder replaces the old one only once it is complete (written beside it, then renamed)
    check_output(args.out_dir, resume=False, overwrite=args.overwrite, what="model folder")
    if args.command == "hf-to-native":
        out = hf_to_native(args.in_dir, args.out_dir)
    else:
        overrides = {"qk_scale": args.qk_scale}
        if args.rope_theta is not None:
            overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}
        out = nanochat_to_hf(
            args.ckpt_dir,
            args.out_dir,
            step=args.step,
            tokenizer_dir=args.tokenizer_dir,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            **overrides,
        )
    print(f"wrote {out}")


def cli() -> None:
    """The `hfnanochat-convert` console script."""
    main_entry(main)


if __name__ == "__main__":
    cli()
