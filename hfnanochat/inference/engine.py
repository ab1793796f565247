"""Streaming generation with nanochat's python tool in the loop, built on transformers' cache classes.

Notable:
- Prefill once, fan out: a batch of prompts (left-padded, `attention_mask` + `position_ids` exactly as `generate`
  builds them) goes through the model once, then `Cache.batch_repeat_interleave(num_samples)` copies each prompt's
  keys/values to its samples. A 16-sample RL rollout pays for one prompt forward, not sixteen.
- Every row samples its own first token from the fanned-out prefill logits. The seed's Engine sampled the first
  token once per prompt and broadcast it to all samples, which made RL rollouts needlessly alike (nanochat HEAD fixed
  it the same way).
- Sampling: temperature (0 = greedy), top-k, top-p, a `torch.Generator` seeded per call, so a seed reproduces a
  rollout. Greedy decoding gives exactly `model.generate(do_sample=False)`'s tokens (tests check it): same masks,
  same positions, same cache, same argmax.
- A row stops on `<|assistant_end|>` or `<|bos|>` (nanochat's two stop tokens). The stop token is yielded and kept in
  `Completion.tokens` with mask 1 (nanochat's generate_batch drops it): the model chose to stop, and RL scores that
  choice too.
- The tool, per row: tokens between `<|python_start|>` and `<|python_end|>` are decoded and given to the calculator
  (`sandbox.calculator`). A result is forced into the row as `<|output_start|>` result `<|output_end|>`; nothing is
  forced when the calculator refuses (nanochat's rule). A tool that raises, or returns more than
  MAX_TOOL_OUTPUT_TOKENS tokens, gets an `error: ...` line forced instead, so no tool can end a batch or fill a row.
  Forced tokens take a row's next steps in place of samples and go through the model like sampled ones, so they sit
  in the KV cache and the model reads the result.
- Every completion comes with a mask: 1 = sampled by the model, 0 = forced by the tool. RL's loss must skip the 0s.
- Two decode paths over the same loop: `DynamicCache` (CPU, any device) and, by default on CUDA, `StaticCache` with
  the model's `torch.compile`d forward (`get_compiled_call`, as `generate(cache_implementation="static")` uses):
  fixed shapes, so one graph (replayed as a CUDA graph) serves every step. The target is launch overhead: the seed's
  eager Engine ran at ~2% of the H100's bandwidth bound at batch 1. Our models
  generate inside `fast_decode(model)`: one GEMM for q, k and v per layer (restacked from the weights at each call)
  and, at batch 1 on CUDA, Triton kernels with the norms and adds fused into the GEMVs (`decode_kernels`). The
  StaticCache outlives the call and is reset for the next one of the same shape: the CUDA graph is recorded over
  the cache's addresses, so a new cache per call (a chat turn, an RL rollout) would record it again each time.

Why forced tokens go one per step rather than in one multi-token forward: rows of a batch advance together, so a
multi-token step for one row would leave holes in every other row's cache (masked slots), which grows a static cache
by an amount nobody can bound up front and shrinks sliding windows, which count slots, not tokens. One token per
row per step keeps every row's cache contiguous and the static cache no longer than `prompt + max_new_tokens`
(rounded up to a bucket). The price: a calculator result costs one decode step per forced token, its own tokens plus
<|output_start|> and <|output_end|>, so 3 steps for "84" but many more for a long result like 10/3 = 3.3333333333.
"""

import contextlib
import inspect
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from ..modeling_hfnanochat import rope_position_limit
from ..tokenizer import get_special_token_ids
from .fast_decode import fast_decode, supports_fast_decode
from .sandbox import calculator

# Static caches are sized in multiples of this many slots, so a chat whose prompt grows turn by turn reuses a few
# compiled graphs instead of compiling one per length (dynamo gives up after 8 recompiles and runs eager).
STATIC_CACHE_BUCKET = 256

# A tool output longer than this is replaced by an error line. The calculator's longest is ~30 characters (numbers are
# capped at 1e15); another tool could return a flood that would fill every remaining step of its row.
MAX_TOOL_OUTPUT_TOKENS = 64


@dataclass
class Completion:
    """One sample: the generated tokens (stop token included when it stopped) and who wrote each of them."""

    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the model, 0 = forced tool output
    finish_reason: str = "length"  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """(rows, vocab) fp32 logits -> (rows,) token ids. Temperature 0 is argmax; otherwise top-k, then top-p
    (the smallest set of tokens whose probability reaches top_p), then one multinomial draw per row."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:  # None or 0: no top-k (nanochat HEAD also reads 0 as "off")
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely token always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class _Row:
    """Per-row state of the tool machine: collecting a python call, and the tokens queued to be forced."""

    __slots__ = ("done", "in_python", "code", "forced")

    def __init__(self):
        self.done = False
        self.in_python = False
        self.code: list[int] = []
        self.forced: deque[int] = deque()


class Engine:
    """Generation for a causal LM that speaks nanochat's chat format.

    model: `HFNanoChatForCausalLM` or any transformers causal LM (forward with a cache, `position_ids`,
        `attention_mask`, `logits_to_keep`). Put it in eval mode and on its device first.
    tokenizer: the chat tokenizer (it supplies the special tokens and encodes tool results). Without one the engine
        is a plain sampler: no stop tokens and no tool (benchmarks on random weights).
    tool: `expr -> str | None`, called on the text of each python call; None disables tool use.
    cache_implementation: "dynamic" or "static"; compile: decode through `model.get_compiled_call`. Both default to
        static + compiled on CUDA and dynamic, uncompiled elsewhere. A static engine keeps its last StaticCache for
        the next call of the same shape (`clear_cache` frees it).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        tool: Callable[[str], str | None] | None = calculator,
        cache_implementation: str | None = None,
        compile: bool | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else bool(compile)
        if cache_implementation is None:
            cache_implementation = "static" if self.compile else "dynamic"
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        if self.compile and cache_implementation != "static":
            raise ValueError(
                "compile=True needs cache_implementation='static': a dynamic cache changes shape every step"
            )
        self.static = cache_implementation == "static"
        # transformers renamed `past_key_values` to `cache` during 5.x; models accept one or both
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if tokenizer is not None:
            special = get_special_token_ids(tokenizer)
            self.stop_ids = {special["assistant_end"], special["bos"]}
            self.pad_id = special["bos"]
            self.special = special
            self.tool = tool
        else:
            self.stop_ids, self.pad_id, self.special, self.tool = set(), 0, {}, None
        self._decode_call = None  # the compiled forward, made on first use (compiling takes a while)
        # the last call's StaticCache, reused (see _static_copy), and the generation using it now, if any
        self._static_cache, self._static_key, self._static_owner = None, None, None
        self._static_lock = threading.Lock()  # two threads (a Space serving two chats) must not both take it
        self._fast_decode = supports_fast_decode(model)  # our models: fused q/k/v, decode kernels

    def clear_cache(self) -> None:
        """Free the StaticCache kept from the last call (see `_static_copy`), e.g. to give its memory to a training
        step between two RL rollouts. The next call allocates a new one, and its CUDA graph is recorded again."""
        self._static_cache, self._static_key = None, None

    # ----------------------------------------------------------------------------------------------------------------

    def _forward(self, call, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
        out = call(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        # a copy: with CUDA graphs the logits live in a buffer that the next replay overwrites
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _static_copy(self, cache: DynamicCache, capacity: int, owner: object) -> StaticCache:
        """The prefilled (and fanned-out) dynamic cache, written into a StaticCache through its own `update`, which
        also keeps only the window of sliding layers. StaticCache has no batch_repeat_interleave, hence prefilling
        into a dynamic cache first.

        The StaticCache of the previous call is reset and reused when the shapes match: the compiled step's CUDA
        graph reads the cache at the addresses it was recorded with, and a new cache at new addresses makes
        torch.compile record the graph again (milliseconds per call, and a node more in its tree each time). So a
        chat turn or an RL rollout of the same shape as the last one replays the recorded graph."""
        first = cache.layers[0].keys
        key = (capacity, tuple(first.shape[:2]), first.dtype, first.device, len(cache.layers))
        with self._static_lock:
            owned = self._static_owner is None  # else another generation, not run to its end yet, is using it
            if owned:
                self._static_owner = owner
        static = self._static_cache if owned and self._static_key == key else None
        if static is None:
            if owned:
                self._static_cache = None  # the old cache's memory is free for the new one
            static = StaticCache(config=self.model.config, max_cache_len=capacity)
            # a model may keep more than keys and values in layers after its attention layers (our smear option):
            # plain static layers of the same capacity hold them
            static.layers += [StaticLayer(max_cache_len=capacity) for _ in cache.layers[len(static.layers) :]]
            if len(static.layers) != len(cache.layers):
                raise ValueError(
                    f"StaticCache has {len(static.layers)} layers but the model filled {len(cache.layers)}"
                )
        else:
            static.reset()  # zeroed slots and write positions, as a new cache has them; same tensors
        for dst, src in zip(static.layers, cache.layers):
            dst.update(src.keys, src.values)
        if owned:
            self._static_cache, self._static_key = static, key
        return static

    def _tool_step(self, row: _Row, token: int) -> None:
        """Advance a row's tool machine on a token the model sampled."""
        special = self.special
        if token == special["python_start"]:
            row.in_python, row.code = True, []
        elif token == special["python_end"] and row.in_python:
            row.in_python = False
            try:
                result = self.tool(self.tokenizer.decode(row.code))
            except Exception as e:  # a user's tool failing must not end every row of the batch
                result = f"error: {type(e).__name__}: {e}"
            if result is not None:
                # plain text, like a rendered tool output: a special-token string in a result stays text
                ids = self.tokenizer.encode(str(result), add_special_tokens=False, split_special_tokens=True)
                if len(ids) > MAX_TOOL_OUTPUT_TOKENS:  # a flood would take the row's remaining steps
                    ids = self.tokenizer.encode(f"error: output of {len(ids)} tokens", add_special_tokens=False)
                row.forced.extend([special["output_start"], *ids, special["output_end"]])
        elif row.in_python:
            row.code.append(token)

    def _validate(self, prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed):
        """Check every argument; return the prompts as a list of lists, and whether one prompt (not a batch) came."""

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not isinstance(prompts, Sequence) or isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token ids, or a non-empty list of such lists")
        single = is_int(prompts[0])
        if not single and not all(isinstance(p, Sequence) and not isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of token ids, or a list of such lists, not a mix of the two")
        batch = [list(prompts)] if single else [list(p) for p in prompts]
        vocab = self.model.config.vocab_size
        for i, p in enumerate(batch):
            if not p:
                raise ValueError(f"prompt {i} is empty: it needs at least one token (e.g. <|bos|>)")
            bad = [t for t in p if not is_int(t) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has entries that are not token ids in [0, {vocab}): {bad[:5]}")
        if not is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0 (0 = off), got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        # our models: the RoPE tables cover this many positions
        limit = rope_position_limit(self.model.config) if supports_fast_decode(self.model) else None
        longest = max(len(p) for p in batch)
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(
                f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's {limit} positions"
            )
        return batch, single

    # ----------------------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[int] | Sequence[Sequence[int]],
        num_samples: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int | None], list[int | None]]]:
        """Stream tokens. `prompts` is one prompt (a list of ids) or a batch of them (any lengths).

        Yields once per step `(tokens, mask)`, two lists with one entry per row: row `p * num_samples + s` is sample
        `s` of prompt `p`. A row's entry is its new token and 1 (sampled) or 0 (forced), or None/None once the row
        has stopped. A row stops after sampling a stop token (which it yields) or after `max_new_tokens` tokens.
        Bad arguments raise ValueError here, before anything runs.
        """
        batch, _ = self._validate(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed)
        return self._generate(batch, num_samples, max_new_tokens, temperature, top_k, top_p, seed)

    def _generate(self, *args):
        # one q/k/v stack per call, built from the current weights (they may have changed since the last call, in
        # RL) and held for the whole generation: entering the context per step would cost ~40 us of Python a token
        owner = object()
        try:
            # overlapping generations (a Space's threads, two engines on one model) share one class swap
            with fast_decode(self.model) if self._fast_decode else contextlib.nullcontext():
                yield from self._steps(*args, owner)
        finally:  # run to its end, closed, or dropped: the static cache is free for the next call
            with self._static_lock:
                if self._static_owner is owner:
                    self._static_owner = None

    @torch.no_grad()
    def _steps(self, batch, num_samples, max_new_tokens, temperature, top_k, top_p, seed, owner):
        model, device = self.model, self.device
        n_rows = len(batch) * num_samples

        # Prefill, left-padded like generate: pad slots are masked out, positions count real tokens only
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            prompt_mask[i, width - len(p) :] = 1
        input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
        position_ids = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
        # Static path: prefill into a config-less DynamicCache, which keeps every layer's full keys, so the copy
        # into the StaticCache sees the true length even for sliding-window layers.
        cache = DynamicCache() if self.static else DynamicCache(config=model.config)
        logits = self._forward(model, input_ids, position_ids, prompt_mask, cache)

        # Fan out: each prompt's cache and last logits to its num_samples rows
        if num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
        next_position = prompt_mask.sum(-1, keepdim=True)  # (rows, 1): each row's real length
        capacity = width + max_new_tokens
        if self.static:
            capacity = math.ceil(capacity / STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        # Slots after the prompt are all real tokens; causality, not this mask, hides the ones not yet written
        attention_mask = torch.ones((n_rows, capacity), dtype=torch.long, device=device)
        attention_mask[:, :width] = prompt_mask
        if self.static:
            cache = self._static_copy(cache, capacity, owner)
            if self.compile and self._decode_call is None:
                self._decode_call = model.get_compiled_call(getattr(model.generation_config, "compile_config", None))
        decode = self._decode_call if self.compile else model

        generator = torch.Generator(device=device).manual_seed(seed)
        rows = [_Row() for _ in range(n_rows)]
        on_cuda = device.type == "cuda"
        host_tokens = torch.empty(n_rows, dtype=torch.long, pin_memory=on_cuda)
        copied = torch.cuda.Event() if on_cuda else None
        for step in range(max_new_tokens):
            forced = [row.forced.popleft() if row.forced and not row.done else None for row in rows]
            tokens = sample_next_token(logits, generator, temperature, top_k, top_p)
            if any(f is not None for f in forced):
                override = torch.tensor([-1 if f is None else f for f in forced], device=device)
                tokens = torch.where(override >= 0, override, tokens)
            # The host needs this step's tokens (to stream them, to stop rows, to run the tool), the GPU needs them as
            # the next step's input. Queue the copy to the host, then the next forward, and only then wait for the
            # copy: the Python below runs while the GPU computes the next step. The tool never changes the input of
            # the forward launched here (its result replaces the samples of later steps), so launching it early is
            # always right; only when every row has just stopped is it wasted, once per call.
            host_tokens.copy_(tokens, non_blocking=on_cuda)
            if on_cuda:
                copied.record()
            if step + 1 < max_new_tokens:
                length = width + step + 1
                mask = attention_mask if self.static else attention_mask[:, :length]
                next_logits = self._forward(decode, tokens[:, None], next_position + step, mask, cache)
            if on_cuda:
                copied.synchronize()
            out_tokens, out_mask = [], []
            for row, token, f in zip(rows, host_tokens.tolist(), forced):
                if row.done:
                    out_tokens.append(None)
                    out_mask.append(None)
                    continue
                out_tokens.append(token)
                out_mask.append(0 if f is not None else 1)
                if f is None:
                    if token in self.stop_ids:
                        row.done = True
                    elif self.tool is not None:
                        self._tool_step(row, token)
            yield out_tokens, out_mask
            if step + 1 == max_new_tokens or all(row.done for row in rows):
                return
            # Stopped rows keep stepping with their last token: the batch stays rectangular; their logits are unused
            logits = next_logits

    def generate_batch(
        self,
        prompts: Sequence[int] | Sequence[Sequence[int]],
        num_samples: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
    ) -> list[Completion] | list[list[Completion]]:
        """Run `generate` to the end. One prompt -> `num_samples` Completions; a batch of prompts -> one such list
        per prompt, in order."""
        batch, single = self._validate(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed)
        completions = [Completion() for _ in range(len(batch) * num_samples)]
        for tokens, mask in self._generate(batch, num_samples, max_new_tokens, temperature, top_k, top_p, seed):
            for c, t, m in zip(completions, tokens, mask):
                if t is not None:
                    c.tokens.append(t)
                    c.mask.append(m)
        for c in completions:
            if c.mask[-1] == 1 and c.tokens[-1] in self.stop_ids:
                c.finish_reason = "stop"
        grouped = [completions[i : i + num_samples] for i in range(0, len(completions), num_samples)]
        return grouped[0] if single else grouped


__all__ = ["Completion", "Engine", "sample_next_token", "MAX_TOOL_OUTPUT_TOKENS", "STATIC_CACHE_BUCKET"]
