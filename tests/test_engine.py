"""The engine: equal to `generate` when greedy, batching and fan-out, seeded sampling, the tool state machine."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM
from hfnanochat.inference import decode_kernels
from hfnanochat.inference.engine import STATIC_CACHE_BUCKET, Engine, sample_next_token
from hfnanochat.inference.fast_decode import FusedQKVAttention
from hfnanochat.tokenizer import get_special_token_ids, train_tokenizer

ALL_2026 = dict(
    window_pattern="SSL",
    short_window=4,  # shorter than the prompts: the sliding layers really slide, in prefill and in decode
    value_embeddings=True,
    residual_scalars=True,
    qk_scale=1.2,
    smear=True,  # embeddings kept in a cache layer of their own: fan-out and the static copy must carry them
    backout=True,
)


def syllable_text(n_docs=300, seed=0):
    """Random syllable words and a little arithmetic: varied enough for a 512-token BPE."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    docs = []
    for _ in range(n_docs):
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(40)]
        docs.append(" ".join(words) + f" {rng.randint(0, 99)}*{rng.randint(0, 99)} = {rng.randint(0, 999)}.")
    return docs


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(syllable_text(), vocab_size=512)


def tiny_config(vocab_size=512, **overrides):
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return HFNanoChatConfig(**(kwargs | overrides))


def random_model(config, seed=0):
    """Every weight non-zero (nanochat zero-inits projections and the head, which would hide cache bugs)."""
    torch.manual_seed(seed)
    model = HFNanoChatForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 2 else 0.1) + (1.0 if "lambdas" in name else 0.0))
    return model.eval()


def scripted_model(tokenizer, *chains, seed=0):
    """A real HFNanoChatForCausalLM whose greedy continuation of token a is b, for each a -> b in the chains.

    With nanochat's init every block's output projection is zero, so each block adds nothing and the last hidden
    state is the normed embedding of the current token; the head then maps that embedding to the chosen next token
    (logit 15*tanh(24/15) = 13.8 against < 10 for any other, whatever random embeddings the seed draws). A bigram
    model cannot branch, so each token may lead to one token only.
    """
    nxt = {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            assert nxt.setdefault(a, b) == b, f"token {a} is scripted to lead to both {nxt[a]} and {b}"
    torch.manual_seed(seed)
    model = HFNanoChatForCausalLM(tiny_config(len(tokenizer))).eval()
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        assert model.lm_head.weight.abs().sum() == 0 and model.model.layers[0].self_attn.o_proj.weight.abs().sum() == 0
        for a, b in nxt.items():
            model.lm_head.weight[b] += 3.0 * emb[a] / emb[a].norm()
    return model


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def chat_prompt(tokenizer, text):
    sp = get_special_token_ids(tokenizer)
    return [sp["bos"], sp["user_start"], *encode(tokenizer, text), sp["user_end"], sp["assistant_start"]]


def reference_greedy(model, tokenizer, prompt, n):
    """`model.generate`'s greedy tokens, stop token included, padding after it dropped."""
    sp = get_special_token_ids(tokenizer)
    stops = [sp["assistant_end"], sp["bos"]]
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=sp["bos"])
    out = out[0, len(prompt) :].tolist()
    for i, t in enumerate(out):
        if t in stops:
            return out[: i + 1]
    return out


def syllable_prompts(tokenizer, lengths, seed=1):
    rng = random.Random(seed)
    bos = get_special_token_ids(tokenizer)["bos"]
    return [[bos, *rng.choices(range(256, 480), k=n - 1)] for n in lengths]


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, ALL_2026], ids=["seed", "2026"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_equals_generate_batched_and_fanned_out(tokenizer, options, cache):
    """Different prompt lengths in one batch, 2 samples each: every row equals `generate` on its prompt alone."""
    model = random_model(tiny_config(**options))
    prompts = syllable_prompts(tokenizer, (3, 11, 6))
    engine = Engine(model, tokenizer, cache_implementation=cache, compile=False)
    fused_calls = []  # the engine decodes with one q/k/v GEMM per layer; generate (the reference) with three
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: fused_calls.append(isinstance(m, FusedQKVAttention))
    )
    results = engine.generate_batch(prompts, num_samples=2, max_new_tokens=12, temperature=0.0)
    assert fused_calls and all(fused_calls)
    sp = get_special_token_ids(tokenizer)
    for prompt, samples in zip(prompts, results):
        expected = reference_greedy(model, tokenizer, prompt, 12)
        assert not fused_calls[-1]
        assert sp["python_end"] not in expected  # no tool call: the comparison with generate is meaningful
        for s in samples:
            assert s.tokens == expected
            assert s.mask == [1] * len(expected)
            assert s.finish_reason == ("stop" if expected[-1] in (sp["assistant_end"], sp["bos"]) else "length")


def test_any_transformers_causal_lm(tokenizer):
    """A stock Llama with our tokenizer: same engine, same equality with its own `generate`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompts = syllable_prompts(tokenizer, (4, 9))
    results = Engine(model, tokenizer).generate_batch(prompts, max_new_tokens=10, temperature=0.0)
    for prompt, (sample,) in zip(prompts, results):
        assert sample.tokens == reference_greedy(model, tokenizer, prompt, 10)


def test_streaming_rows_and_batch_equal_one_by_one(tokenizer):
    """Streaming yields one entry per row per step; each row equals generate_batch's and its prompt run alone."""
    model = random_model(tiny_config())
    engine = Engine(model, tokenizer)
    prompts = syllable_prompts(tokenizer, (5, 2))
    steps = list(engine.generate(prompts, num_samples=3, max_new_tokens=6, temperature=0.0))
    assert len(steps) <= 6 and all(len(tokens) == len(mask) == 6 for tokens, mask in steps)
    batched = engine.generate_batch(prompts, num_samples=3, max_new_tokens=6, temperature=0.0)
    for p, prompt in enumerate(prompts):
        alone = engine.generate_batch(prompt, max_new_tokens=6, temperature=0.0)[0]
        for s in range(3):
            streamed = [tokens[p * 3 + s] for tokens, _ in steps if tokens[p * 3 + s] is not None]
            assert streamed == batched[p][s].tokens == alone.tokens


def test_static_cache_is_reused_across_calls_but_never_shared_by_two_live_generations(tokenizer):
    """Same shapes as the last call: its StaticCache (and the smear buffer) again, so a compiled step replays its
    CUDA graph at the addresses it recorded. Reset in between (results equal a fresh engine's), and a generation
    that starts while another is still streaming gets a cache of its own."""
    model = random_model(tiny_config(**ALL_2026))
    engine = Engine(model, tokenizer, cache_implementation="static", compile=False)
    first, second = syllable_prompts(tokenizer, (3, 11), seed=1), syllable_prompts(tokenizer, (3, 11), seed=2)

    def fresh(prompts):
        return Engine(model, tokenizer, cache_implementation="static", compile=False).generate_batch(
            prompts, num_samples=2, max_new_tokens=12, temperature=0.0
        )

    expected_first, expected_second = fresh(first), fresh(second)
    assert engine.generate_batch(first, num_samples=2, max_new_tokens=12, temperature=0.0) == expected_first
    cache = engine._static_cache
    assert engine.generate_batch(second, num_samples=2, max_new_tokens=12, temperature=0.0) == expected_second
    assert engine._static_cache is cache

    # two generations streamed in lockstep: each has its own cache, and both equal their runs alone
    a = engine.generate(first, num_samples=2, max_new_tokens=12, temperature=0.0)
    b = engine.generate(second, num_samples=2, max_new_tokens=12, temperature=0.0)
    rows_a, rows_b = [[] for _ in range(4)], [[] for _ in range(4)]
    for rows, stream in ((rows_a, a), (rows_b, b), (rows_a, a), (rows_b, b)) * 6:
        for row, token in zip(rows, next(stream, ([None] * 4, None))[0]):
            if token is not None:
                row.append(token)
    assert rows_a == [s.tokens for samples in expected_first for s in samples]
    assert rows_b == [s.tokens for samples in expected_second for s in samples]
    assert engine._static_owner is not None  # `a` has yielded its last step but has not returned yet
    assert next(a, None) is None and next(b, None) is None
    assert engine._static_cache is cache and engine._static_owner is None
    dropped = engine.generate(first, max_new_tokens=12, temperature=0.0)
    next(dropped)
    dropped.close()  # a generation abandoned midway frees the cache too
    assert engine._static_owner is None

    longer = syllable_prompts(tokenizer, (STATIC_CACHE_BUCKET,))  # the next capacity bucket: a new cache
    engine.generate_batch(longer, max_new_tokens=2, temperature=0.0)
    assert engine._static_cache is not cache
    engine.clear_cache()
    assert engine._static_cache is None
    assert engine.generate_batch(first, num_samples=2, max_new_tokens=12, temperature=0.0) == expected_first


def test_seeded_sampling_is_reproducible_and_rows_differ_from_the_first_token(tokenizer):
    model = random_model(tiny_config())
    engine = Engine(model, tokenizer)
    prompt = syllable_prompts(tokenizer, (6,))[0]
    kwargs = dict(num_samples=8, max_new_tokens=8, temperature=1.0, top_k=50, seed=123)
    a = [s.tokens for s in engine.generate_batch(prompt, **kwargs)]
    b = [s.tokens for s in engine.generate_batch(prompt, **kwargs)]
    c = [s.tokens for s in engine.generate_batch(prompt, **(kwargs | {"seed": 124}))]
    assert a == b
    assert a != c
    assert len({tuple(t) for t in a}) == 8
    # each row draws its own first token (the seed's Engine gave all samples the same one)
    assert len({t[0] for t in a}) > 1


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 2000)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, g, temperature=1.0, top_k=2).tolist()) == {0, 1}
    # p(0) = 0.64, p(1) = 0.24: top_p 0.7 needs both, top_p 0.5 only the first
    assert set(sample_next_token(logits, g, temperature=1.0, top_p=0.7).tolist()) == {0, 1}
    assert set(sample_next_token(logits, g, temperature=1.0, top_p=0.5).tolist()) == {0}
    assert set(sample_next_token(logits, g, temperature=1.0).tolist()) == {0, 1, 2, 3, 4}
    assert sample_next_token(logits[:3], g, temperature=0.0).tolist() == [0, 0, 0]


def tool_script(tokenizer, code):
    """Chains for a model that answers any prompt ending in <|assistant_start|> with a python call of `code`, says
    " done" after a tool output and " nope" when no output came."""
    sp = get_special_token_ids(tokenizer)
    call = [sp["assistant_start"], sp["python_start"], *encode(tokenizer, code), sp["python_end"]]
    after_output = [sp["output_end"], *encode(tokenizer, " done"), sp["assistant_end"]]
    no_output = [sp["python_end"], *encode(tokenizer, " nope"), sp["assistant_end"]]
    return call, after_output, no_output


def test_tool_output_is_forced_into_the_stream_with_mask_zero(tokenizer):
    sp = get_special_token_ids(tokenizer)
    call, after_output, no_output = tool_script(tokenizer, "12*7")
    # a second prompt whose row reaches its tool call 3 steps later: forced and sampled tokens share steps
    lead_in = [*encode(tokenizer, " ba"), *encode(tokenizer, " ki"), sp["user_end"], sp["assistant_start"]]
    model = scripted_model(tokenizer, call, after_output, no_output, lead_in)
    engine = Engine(model, tokenizer)
    prompt = chat_prompt(tokenizer, "what is 12 times 7")
    late = [sp["bos"], sp["user_start"], lead_in[0]]
    first, second = engine.generate_batch([prompt, late], num_samples=2, max_new_tokens=30, temperature=0.0)

    forced = [sp["output_start"], *encode(tokenizer, "84"), sp["output_end"]]
    expected = [*call[1:], *forced, *after_output[1:]]
    expected_mask = [1] * (len(call) - 1) + [0] * len(forced) + [1] * (len(after_output) - 1)
    for s in first:
        assert s.tokens == expected and s.mask == expected_mask and s.finish_reason == "stop"
    for s in second:
        assert s.tokens == [*lead_in[1:], *expected] and s.mask == [1] * (len(lead_in) - 1) + expected_mask
    assert tokenizer.decode(first[0].tokens, skip_special_tokens=True) == "12*784 done"
    # the same prompt alone gives the same tokens, and sampling at a low temperature takes the same path
    assert engine.generate_batch(late, max_new_tokens=30, temperature=0.0)[0].tokens == second[0].tokens
    hot = engine.generate_batch(prompt, num_samples=3, max_new_tokens=30, temperature=0.3, seed=7)
    assert all(s.tokens == expected and s.mask == expected_mask for s in hot)


def test_refused_tool_call_forces_nothing_and_tool_can_be_disabled(tokenizer):
    sp = get_special_token_ids(tokenizer)
    call, after_output, no_output = tool_script(tokenizer, "3/0")  # division by zero: the calculator says None
    model = scripted_model(tokenizer, call, after_output, no_output)
    prompt = chat_prompt(tokenizer, "three over zero")
    (sample,) = Engine(model, tokenizer).generate_batch(prompt, max_new_tokens=30, temperature=0.0)
    assert sample.tokens == [*call[1:], *no_output[1:]] and set(sample.mask) == {1}

    call, after_output, no_output = tool_script(tokenizer, "12*7")
    model = scripted_model(tokenizer, call, after_output, no_output)
    (sample,) = Engine(model, tokenizer, tool=None).generate_batch(prompt, max_new_tokens=30, temperature=0.0)
    assert sample.tokens == [*call[1:], *no_output[1:]] and sp["output_start"] not in sample.tokens


def test_max_new_tokens_cuts_a_forced_output(tokenizer):
    call, after_output, no_output = tool_script(tokenizer, "12*7")
    model = scripted_model(tokenizer, call, after_output, no_output)
    n = len(call)  # the call (len(call) - 1 tokens) and then only <|output_start|>
    (sample,) = Engine(model, tokenizer).generate_batch(chat_prompt(tokenizer, "hi"), max_new_tokens=n, temperature=0.0)
    assert sample.tokens == [*call[1:], get_special_token_ids(tokenizer)["output_start"]]
    assert sample.mask == [1] * (n - 1) + [0] and sample.finish_reason == "length"


def test_bad_arguments_raise_clear_errors(tokenizer):
    engine = Engine(random_model(tiny_config()), tokenizer)
    prompt = [1, 2, 3]
    for kwargs, match in [
        (dict(prompts=[]), "non-empty"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, 2], 3]), "not a mix"),
        (dict(prompts=[True, 2]), "not a mix"),  # a bool is not a token id, so this is no single prompt either
        (dict(prompts=[1, 9999]), r"token ids in \[0, 512\)"),
        (dict(num_samples=0), "num_samples"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed=1.5), "seed"),
        (dict(max_new_tokens=1278), "exceeds the model's 1280 positions"),  # RoPE tables: 10 x 128 positions
    ]:
        with pytest.raises(ValueError, match=match):
            engine.generate_batch(**({"prompts": prompt} | kwargs))
    with pytest.raises(ValueError, match="needs cache_implementation='static'"):
        Engine(engine.model, tokenizer, cache_implementation="dynamic", compile=True)
    with pytest.raises(ValueError, match="cache_implementation"):
        Engine(engine.model, tokenizer, cache_implementation="paged")


def test_generate_batch_shape_follows_the_prompt_form(tokenizer):
    engine = Engine(random_model(tiny_config()), tokenizer)
    kwargs = dict(num_samples=2, max_new_tokens=2, temperature=0.0)
    for single in ([1, 2, 3], (1, 2, 3), torch.tensor([1, 2, 3])):  # one prompt -> its samples
        samples = engine.generate_batch(single, **kwargs)
        assert len(samples) == 2 and all(len(s.tokens) == 2 for s in samples)
    for batch in ([[1, 2, 3], [4, 5]], torch.tensor([[1, 2, 3], [4, 5, 6]])):  # a batch -> samples per prompt
        grouped = engine.generate_batch(batch, **kwargs)
        assert len(grouped) == 2 and all(len(samples) == 2 for samples in grouped)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile (inductor) on CPU needs a C++ compiler")
def test_compiled_static_decode_equals_generate_on_cpu(tokenizer):
    """The decode path CUDA uses by default (static cache + the model's compiled forward), minus the CUDA graphs."""
    model = random_model(tiny_config(**ALL_2026))  # smear's state has to go through the compiled graph too
    engine = Engine(model, tokenizer, cache_implementation="static", compile=True)
    prompts = syllable_prompts(tokenizer, (3, 11, 6))
    try:
        for _ in range(2):  # the second call reuses the compiled graph with a new StaticCache
            results = engine.generate_batch(prompts, num_samples=2, max_new_tokens=12, temperature=0.0)
            for prompt, samples in zip(prompts, results):
                assert all(s.tokens == reference_greedy(model, tokenizer, prompt, 12) for s in samples)
    finally:
        torch._dynamo.reset()  # leave no compiled graphs behind for other tests


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled static-cache decode path is CUDA's default")
def test_cuda_default_is_compiled_static_decode_and_equals_generate(tokenizer, monkeypatch):
    # as in a fresh process: the decode kernels' attention counters are made when the engine enters fast_decode,
    # not inside the cudagraph pool where torch.compile warms the step up
    monkeypatch.setattr(decode_kernels, "_ARRIVALS", {})
    model = random_model(tiny_config(**ALL_2026)).cuda()
    engine = Engine(model, tokenizer)
    assert engine.static and engine.compile
    prompts = syllable_prompts(tokenizer, (3, 11, 6))
    for _ in range(2):  # the second call replays the compiled graphs over the same StaticCache
        results = engine.generate_batch(prompts, num_samples=2, max_new_tokens=12, temperature=0.0)
        for prompt, samples in zip(prompts, results):
            assert all(s.tokens == reference_greedy(model, tokenizer, prompt, 12) for s in samples)
    sp = get_special_token_ids(tokenizer)
    call, after_output, no_output = tool_script(tokenizer, "12*7")
    engine = Engine(scripted_model(tokenizer, call, after_output, no_output).cuda(), tokenizer)
    (sample,) = engine.generate_batch(chat_prompt(tokenizer, "hi"), max_new_tokens=30, temperature=0.0)
    forced = [sp["output_start"], *encode(tokenizer, "84"), sp["output_end"]]
    assert sample.tokens == [*call[1:], *forced, *after_output[1:]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (the compiled decode path on CUDA)")
def test_cuda_graph_is_recorded_once_for_calls_of_one_cache_shape(tokenizer, monkeypatch):
    """Prompts of different lengths in one capacity bucket: one StaticCache, so torch.compile records the decode
    step's CUDA graph in the first call only (a new cache at new addresses made it record again, call after call)."""
    from torch._inductor import cudagraph_trees

    monkeypatch.setattr(decode_kernels, "_ARRIVALS", {})  # as in a fresh process (see the test above)
    engine = Engine(random_model(tiny_config()).cuda(), tokenizer)
    manager, recordings = cudagraph_trees.CUDAGraphTreeManager, []
    record = manager.record_function
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(manager, "record_function", lambda self, *a, **k: recordings.append(1) or record(self, *a, **k))
        for call, length in enumerate((20, 20, 30, 25, 40)):
            engine.generate_batch(syllable_prompts(tokenizer, (length,)), max_new_tokens=10, temperature=0.0)
            if call == 0:
                first = len(recordings)
    assert first > 0 and len(recordings) == first


def test_decode_benchmark_runs_on_cpu_with_tiny_flags():
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "bench" / "decode.py"), "--depth", "2", "--prompt-len", "16", "--new-tokens", "8"]
    r = subprocess.run([*cmd, "--device", "cpu", "--repeats", "1"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(repo)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["impl"], row["cache"], row["batch"]) for row in rows] == [
        (impl, cache, b) for b in (1, 32) for impl in ("engine", "generate") for cache in ("dynamic", "static")
    ]
    assert all(row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 for row in rows)


def test_decode_benchmark_with_tokenizer_runs_the_tool_machine(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        str(repo / "bench" / "decode.py"),
        "--depth",
        "2",
        "--prompt-len",
        "16",
        "--new-tokens",
        "8",
        "--vocab-size",
        str(len(tokenizer)),
        "--batch-sizes",
        "2",
        "--configs",
        "engine/dynamic,generate/dynamic",
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--tokenizer",
        str(tmp_path / "tok"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 0, r.stderr
    engine, generate = [json.loads(line) for line in r.stdout.splitlines()]
    assert engine["tool_machine"] and not generate["tool_machine"]
    assert 2 <= engine["tokens_made"] <= 2 * 8 and generate["tokens_made"] == 2 * 8
    too_small = subprocess.run(
        [*cmd[:-2], "--vocab-size", "8", "--tokenizer", str(tmp_path / "tok")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert too_small.returncode != 0 and "more than --vocab-size" in too_small.stderr
