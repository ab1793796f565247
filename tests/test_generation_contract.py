"""`generate()` on hfnanochat behaves as on any transformers causal LM, for the seed architecture and with the 2026
options on (transformers' own generation tests are not in its source distribution, so these are ours):
left-padded batches, cache on/off, static vs dynamic cache, beam search, seeded sampling, scores, assisted
generation, and token-for-token equality with transformers' built-in NanoChat on exported weights.

Random tiny models with weights drawn away from nanochat's init (its zero LM head would make every greedy token 0).
"""

import pytest
import torch
from transformers import NanoChatForCausalLM

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM
from hfnanochat.convert import hf_to_native

VOCAB = 96
OPTIONS_2026 = dict(
    window_pattern="SSSL",
    short_window=4,  # shorter than the prompts, so the windows matter
    value_embeddings=True,
    residual_scalars=True,
    smear=True,
    backout=True,
    qk_scale=1.2,
    init_scheme="2026",
)
ARCHS = {"seed": {}, "2026": OPTIONS_2026}
NEW = 8


def tiny_model(options: dict, layers: int = 4, seed: int = 0) -> HFNanoChatForCausalLM:
    config = HFNanoChatConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **options,
    )
    torch.manual_seed(seed)
    model = HFNanoChatForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.5)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # fixed-length generations, easy to compare
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return tiny_model(ARCHS[arch])


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 5, 7)]


def left_padded(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def greedy(model, ids, mask=None, **kwargs):
    kwargs = dict(max_new_tokens=NEW, do_sample=False, **kwargs)
    return model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids), **kwargs)


def test_left_padded_batch_rows_equal_single_prompts(model):
    rows = prompts()
    ids, mask = left_padded(rows)
    batch = greedy(model, ids, mask)[:, ids.shape[1] :]
    for i, row in enumerate(rows):
        single = greedy(model, torch.tensor([row]))[0, len(row) :]
        assert batch[i].tolist() == single.tolist(), f"row {i}"


def test_no_cache_equals_cache(model):
    ids, mask = left_padded(prompts())
    assert torch.equal(greedy(model, ids, mask, use_cache=False), greedy(model, ids, mask))


def test_static_cache_equals_dynamic(model):
    ids = torch.tensor([prompts()[0]])
    static = greedy(model, ids, cache_implementation="static")
    assert torch.equal(static, greedy(model, ids))


def test_beam_search_reorders_the_whole_cache(model):
    """Beam search reorders the cache between steps: with the smear option its stored embeddings must follow the
    beams, or the cached run drifts from the uncached one."""
    ids, mask = left_padded(prompts()[:2])
    kwargs = dict(num_beams=2, num_return_sequences=2, early_stopping=True)
    cached = greedy(model, ids, mask, **kwargs)
    uncached = greedy(model, ids, mask, use_cache=False, **kwargs)
    assert cached.shape == (4, ids.shape[1] + NEW)
    assert torch.equal(cached, uncached)


def test_sampling_with_a_seed_is_reproducible(model):
    ids, mask = left_padded(prompts())
    kwargs = dict(max_new_tokens=NEW, do_sample=True, top_k=20, temperature=1.0)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **kwargs))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])
    torch.manual_seed(321)
    other = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert not torch.equal(runs[0], other)


def test_return_dict_in_generate_with_scores(model):
    ids, mask = left_padded(prompts())
    out = greedy(model, ids, mask, return_dict_in_generate=True, output_scores=True, output_logits=True)
    new = out.sequences[:, ids.shape[1] :]
    assert len(out.scores) == len(out.logits) == NEW
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        assert scores.shape == logits.shape == (3, VOCAB)
        assert torch.equal(scores.argmax(-1), new[:, step])
    # the first step's logits are the model's own on the prompt
    direct = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(out.logits[0], direct, rtol=1e-5, atol=1e-5)


def test_assisted_generation_with_a_smaller_hfnanochat(model, arch):
    """Assisted decoding crops the cache back to the accepted tokens after each round of candidates."""
    assistant = tiny_model(ARCHS[arch], layers=1, seed=5)
    ids = torch.tensor([prompts()[0]])
    assisted = greedy(model, ids, assistant_model=assistant)
    assert torch.equal(assisted, greedy(model, ids))


def test_generate_equals_builtin_nanochat_on_exported_weights(tmp_path):
    model = tiny_model({})
    model.save_pretrained(tmp_path / "hf")
    native = NanoChatForCausalLM.from_pretrained(
        hf_to_native(tmp_path / "hf", tmp_path / "native"), dtype=torch.float32
    )
    native.eval()
    ids, mask = left_padded(prompts())
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    ours = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    theirs = native.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)
