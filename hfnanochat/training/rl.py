"""What `train/rl.py` plugs into TRL's `GRPOTrainer`: rollouts by our engine (calculator inside), the GSM8K reward,
nanochat's micro-batches, pass@k evaluation.

Notable:
- `EngineRollout` is a TRL `rollout_func` (trl 1.16, `GRPOTrainer._generate`): called as `rollout_func(prompts,
  trainer)` with this process's slice of the generation batch, in which each prompt already appears
  `num_generations` times in a row (the RepeatSampler's `mini_repeat_count`; the docstring's "no duplication" is
  not what the code passes). It must return one completion per entry, as a dict with the keys TRL requires,
  `prompt_ids`, `completion_ids` and `logprobs` (None: TRL recomputes them with the policy), plus `env_mask`, which
  TRL pops as its `tool_mask` (1 = the model's token, 0 = excluded from the loss). Each run of identical prompts is
  sampled once with `num_samples` = its length: one prefill, fanned out by the engine.
- The loss mask, as nanochat's `chat_rl.py` builds its targets: 1 on sampled tokens, 0 on the calculator's forced
  `<|output_start|>...<|output_end|>` tokens, and 0 on the stop token, which nanochat's `generate_batch` drops and
  its padding (`<|assistant_end|>`, target -1) replaces, so the choice to stop is never trained in nanochat either.
  The stop token stays in `completion_ids`: TRL reads it to tell finished completions from truncated ones.
- Length limit: a completion that reaches `max_new_tokens` without stopping is kept as it is, scored like any other
  (usually 0: no `####` line yet) and trained on with its advantage, as in nanochat (TRL's
  `mask_truncated_completions=False`, its default).
- Seeds: a call's seed hashes the step and the call's prompt token ids, so the same prompts at the same step give the
  same samples whichever process draws them: with `prompts_per_call` dividing every process's share, 1 and N
  processes generate identical rollouts (nanochat seeds per example and step).
- `NanochatGRPOTrainer` keeps the generation batch in order instead of shuffling it before cutting micro-batches
  (TRL's `shuffle_sequence_dict` in `_prepare_inputs`). In order, a micro-batch of 8 is 8 samples of one prompt:
  nanochat's forward pass. `loss_type="bnpo"` divides each micro-batch by its own token count, so the composition
  matters: in order, the update is nanochat's and the same for any number of processes; shuffled, it is neither.
  With one update per generation (`num_iterations=1`, `steps_per_generation` = accumulation) the order of the
  micro-batches within the step changes nothing else.
- `PassAtK`: every N steps, k samples per test question (T=1, top-k 50, 256 tokens) through the same engine; pass@j
  = share of questions with a correct answer among the first j samples, j = 1..k, as nanochat logs it.
"""

import contextlib
import hashlib
import math
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer import grpo_trainer

from ..inference.engine import Engine
from ..inference.sandbox import calculator_with_errors
from ..tasks.gsm8k import gsm8k_reward
from .metrics import append_jsonl, peak_memory_gib


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template's generation prompt: `<|bos|><|user_start|>...<|user_end|><|assistant_start|>`."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def call_seed(step: int, prompts: list[list[int]]) -> int:
    """A seed from the step and the prompts' ids: stable across processes and runs (Python's hash is salted)."""
    digest = hashlib.blake2b(repr((step, prompts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def loss_mask(tokens: list[int], mask: list[int], stop_ids: set[int]) -> list[int]:
    """The engine's mask (1 sampled, 0 forced) with the stop token also 0, as nanochat trains (see the module doc)."""
    out = list(mask)
    if out and out[-1] == 1 and tokens[-1] in stop_ids:
        out[-1] = 0
    return out


def runs(items: list) -> list[tuple[object, int]]:
    """[(item, count)] of consecutive equal items."""
    out = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1][1] += 1
        else:
            out.append([item, 1])
    return [(item, n) for item, n in out]


class EngineRollout:
    """TRL `rollout_func` sampling with `hfnanochat.inference.engine.Engine` (see the module doc).

    `prompts_per_call`: distinct prompts per engine call (one prefill, fan-out, one decode loop for all their
    samples). More is faster on a GPU; 1 makes each prompt's samples independent of the others'.
    `stats` holds the last call's numbers (rollouts, sampled and forced tokens, seconds, tool calls) for the logs.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = 50,
        prompts_per_call: int = 16,
        tool: Callable[[str], str | None] | None = calculator_with_errors,
    ):
        if prompts_per_call < 1:
            raise ValueError(f"prompts_per_call must be >= 1, got {prompts_per_call}")
        self.tokenizer, self.tool = tokenizer, tool
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.prompts_per_call = prompts_per_call
        self.engine, self.stats = None, {}

    def engine_for(self, model) -> Engine:
        if self.engine is None or self.engine.model is not model:
            self.engine = Engine(model, self.tokenizer, tool=self.tool)
        return self.engine

    def sample(self, model, groups: list[tuple[list[int], int]], step: int, autocast=contextlib.nullcontext):
        """Completions for [(prompt ids, samples)], in order: one list of `Completion`s per group."""
        engine = self.engine_for(model)
        was_training = model.training
        model.eval()
        out = []
        try:
            # calls hold prompts wanting the same number of samples (always the case under TRL's sampler)
            i = 0
            while i < len(groups):
                n = groups[i][1]
                j = i
                while j < len(groups) and j - i < self.prompts_per_call and groups[j][1] == n:
                    j += 1
                batch = [ids for ids, _ in groups[i:j]]
                with autocast():
                    out += engine.generate_batch(
                        batch,
                        num_samples=n,
                        max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature,
                        top_k=self.top_k,
                        seed=call_seed(step, batch),
                    )
                i = j
        finally:
            model.train(was_training)
        return out

    def __call__(self, prompts: list, trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        groups = [(prompt_ids(self.tokenizer, messages), n) for messages, n in runs(prompts)]
        t0 = time.perf_counter()
        completions = self.sample(model, groups, trainer.state.global_step, trainer.accelerator.autocast)
        seconds = time.perf_counter() - t0
        stop_ids = self.engine.stop_ids
        output = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": []}
        for (ids, _), samples in zip(groups, completions, strict=True):
            for c in samples:
                output["prompt_ids"].append(ids)
                output["completion_ids"].append(c.tokens)
                output["env_mask"].append(loss_mask(c.tokens, c.mask, stop_ids))
        python_start = self.engine.special["python_start"]
        flat = [c for samples in completions for c in samples]
        self.stats = dict(
            rollouts=len(flat),
            sampled_tokens=sum(sum(c.mask) for c in flat),
            forced_tokens=sum(len(c.mask) - sum(c.mask) for c in flat),
            tool_calls=sum(c.tokens.count(python_start) for c in flat),
            truncated=sum(c.finish_reason == "length" for c in flat),
            seconds=seconds,
        )
        return output


def gsm8k_reward_func(tokenizer) -> Callable:
    """A TRL reward function: 1.0 when the completion's `####` number equals the reference's (`tasks.gsm8k_reward`),
    else 0.0. The completion is decoded from its ids with the special tokens, as nanochat decodes it; an unparseable
    completion scores 0, never raises."""

    def gsm8k(completion_ids, answer, **kwargs) -> list[float]:
        return [gsm8k_reward(tokenizer.decode(ids), ref) for ids, ref in zip(completion_ids, answer, strict=True)]

    return gsm8k


@contextlib.contextmanager
def _in_order():
    shuffle = grpo_trainer.shuffle_sequence_dict
    grpo_trainer.shuffle_sequence_dict = lambda batch: batch
    try:
        yield
    finally:
        grpo_trainer.shuffle_sequence_dict = shuffle


class NanochatGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose micro-batches are consecutive slices of the generation batch (nanochat's passes: 8 samples
    of one prompt) rather than a shuffle of it. See the module doc for why this matters with `bnpo`."""

    def _prepare_inputs(self, generation_batch):
        with _in_order():
            return super()._prepare_inputs(generation_batch)


class PassAtK(TrainerCallback):
    """Every `every` steps (and at step 0 and the last step): pass@1..k on `questions` (a GSM8K prompts Dataset,
    sharded across processes), printed and appended to `metrics_path` as {"step", "pass@1", ...}."""

    def __init__(self, rollout: EngineRollout, questions, k: int, every: int, metrics_path, accelerator):
        self.rollout, self.questions, self.k, self.every = rollout, questions, k, every
        self.metrics_path, self.accelerator = metrics_path, accelerator
        self.results = []

    def evaluate(self, model, step: int) -> dict[str, float]:
        acc = self.accelerator
        mine = self.questions.select(range(acc.process_index, len(self.questions), acc.num_processes))
        groups = [(prompt_ids(self.rollout.tokenizer, row["prompt"]), self.k) for row in mine]
        completions = self.rollout.sample(model, groups, step, acc.autocast) if groups else []
        decode = self.rollout.tokenizer.decode
        correct = [
            [gsm8k_reward(decode(c.tokens), row["answer"]) == 1.0 for c in samples]
            for row, samples in zip(mine, completions, strict=True)
        ]
        counts = torch.tensor(
            [[sum(any(c[:j]) for c in correct) for j in range(1, self.k + 1)] + [len(correct)]],
            dtype=torch.float64,
            device=acc.device,
        )
        counts = acc.reduce(counts, reduction="sum")[0].tolist()
        total = max(counts[-1], 1)
        result = {"step": step, **{f"pass@{j}": counts[j - 1] / total for j in range(1, self.k + 1)}}
        self.results.append(result)
        if acc.is_main_process:
            append_jsonl(self.metrics_path, result)
            acc.print(
                f"step {step:05d} | " + ", ".join(f"pass@{j}: {result[f'pass@{j}']:.4f}" for j in range(1, self.k + 1))
            )
        return result

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step == 0:
            self.evaluate(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.every > 0 and (step % self.every == 0 or step == state.max_steps):
            self.evaluate(model, step)


class RolloutLog(TrainerCallback):
    """One record per step to `metrics_path`: reward, completion length, loss, lr, and the rollouts' speed. The speed
    is this process's (rollouts / the seconds its engine ran) times the number of processes."""

    def __init__(self, rollout: EngineRollout, metrics_path, num_processes: int):
        self.rollout, self.metrics_path, self.num_processes = rollout, metrics_path, num_processes
        self.last = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        stats = self.rollout.stats
        seconds = max(stats.get("seconds", 0.0), 1e-9)
        record = dict(
            step=state.global_step,
            loss=logs["loss"],
            reward=logs.get("reward"),
            reward_std=logs.get("reward_std"),
            completion_length=logs.get("completions/mean_length"),
            clipped_ratio=logs.get("completions/clipped_ratio"),
            lr=logs.get("learning_rate"),
            rollouts_per_sec=stats.get("rollouts", 0) / seconds * self.num_processes,
            tok_per_sec=(stats.get("sampled_tokens", 0) + stats.get("forced_tokens", 0)) / seconds * self.num_processes,
            tool_calls=stats.get("tool_calls"),
            truncated=stats.get("truncated"),
            peak_mem_gib=peak_memory_gib(args.device),
        )
        self.last = record
        if state.is_world_process_zero:
            append_jsonl(self.metrics_path, record)
        if not math.isfinite(logs["loss"]):
            control.should_training_stop = True
