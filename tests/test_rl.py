"""train/rl.py on a tiny model: rewards, nanochat's advantage and loss through TRL's own code, the calculator inside
rollouts, softcap in TRL's log-probs, 1 vs 2 processes, bad input.

The policy is a real HFNanoChatForCausalLM whose blocks add nothing (nanochat's zero-initialised output
projections), so its next-token logits depend on the current token only; its head is set so that each token of one
chain is likely to follow the one before: `<|assistant_start|><|python_start|>3*4<|python_end|>` (the engine forces
`<|output_start|>12<|output_end|>`) `#### 12<|assistant_end|>`. Sampled at temperature 1, a step leaves the chain now
and then, so rewards differ within a group and the updates are not zero. The tokenizer is trained on text where
`####`, `3`, `*`, `4` and `12` are single tokens.
"""

import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM
from hfnanochat.cli import run
from hfnanochat.inference.engine import MAX_TOOL_OUTPUT_TOKENS, Engine
from hfnanochat.inference.sandbox import calculator, calculator_with_errors
from hfnanochat.tasks.gsm8k import extract_answer, gsm8k_prompts, gsm8k_reward
from hfnanochat.tokenizer import get_special_token_ids, save_tokenizer, train_tokenizer
from hfnanochat.training.rl import EngineRollout, call_seed, loss_mask, runs
from hfnanochat.training.rl import prompt_ids as chat_prompt_ids

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"  # ../shared beside the checkout
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dan", "tor", "el"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"train_{name}_script", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rl = _load_script("rl")


def words(rng, n):
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 2))) for _ in range(n))


def write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chain_ids(tok):
    sp = get_special_token_ids(tok)

    def one(text):
        (i,) = tok.encode(text, add_special_tokens=False)
        return i

    call = [sp["assistant_start"], sp["python_start"], one("3"), one("*"), one("4"), sp["python_end"]]
    answer = [sp["output_end"], one(" ####"), one(" "), one("12"), sp["assistant_end"]]
    return call, answer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    rng = random.Random(0)
    texts = [f"{words(rng, 6)} 3*4 #### 12 {rng.randint(0, 99)}" for _ in range(2000)]
    tok = train_tokenizer(texts, vocab_size=512)
    config = HFNanoChatConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = HFNanoChatForCausalLM(config)
    call, answer = chain_ids(tok)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        assert model.lm_head.weight.abs().sum() == 0  # nanochat's zero init: the blocks and the head add nothing
        for a, b in [*zip(call, call[1:]), *zip(answer, answer[1:])]:
            # logit 15 tanh(1.3 * 8 / 15) = 9 for b after a: ~0.95 of the mass against 511 tokens at ~0
            model.lm_head.weight[b] += 1.3 * emb[a] / emb[a].norm()
    model.save_pretrained(root / "sft")
    save_tokenizer(tok, root / "sft")
    rows = [
        {"question": f"{words(rng, rng.randint(2, 6))} three times four?", "answer": "<<3*4=12>>12\n#### 12"}
        for _ in range(8)
    ]
    data = write_jsonl(root / "gsm8k" / "train.jsonl", rows + [{"question": "no answer here", "answer": "12"}])
    write_jsonl(root / "gsm8k" / "test.jsonl", rows[:3])
    return dict(root=root, model=str(root / "sft"), tok=tok, data=data, call=call, answer=answer)


@pytest.fixture(autouse=True)
def one_thread():
    """Rollouts of a 64-wide model are hundreds of tiny ops: on a loaded 2-core machine two OpenMP threads spin
    against each other (the multi-process test runs its processes with OMP_NUM_THREADS=1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flags(env, out, *extra):
    return [
        "--model",
        env["model"],
        "--data",
        env["data"],
        "--out",
        str(out),
        "--prompts-per-step",
        "2",
        "--num-samples",
        "4",
        "--device-batch-size",
        "4",
        "--max-new-tokens",
        "16",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        *extra,
    ]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# -- rewards -----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason="the real GSM8K is not in /work/shared/data")
def test_reward_on_real_gsm8k_rows():
    rows = [json.loads(line) for line in (GSM8K_DIR / "train.jsonl").read_text().splitlines()[:200]]
    for row in rows:
        ref = row["answer"]
        number = ref.rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_answer(ref) == number
        assert gsm8k_reward(ref, ref) == 1.0  # the reference solution scores itself
        assert gsm8k_reward(f"blah <|python_start|>1+1<|python_end|> so\n#### {number}<|assistant_end|>", ref) == 1.0
        assert gsm8k_reward(f"#### {number}1", ref) == 0.0
        assert gsm8k_reward(ref.replace("####", "###"), ref) == 0.0  # no answer line: 0, no exception
    assert gsm8k_reward("#### 1,234", "#### 1234") == 1.0  # nanochat strips commas
    for bad in ("", "####", "#### abc", "\x00#### ", None, 12):
        assert gsm8k_reward(bad, "#### 12") == 0.0
    prompts, skipped = gsm8k_prompts("main", "train", source=str(GSM8K_DIR / "train.jsonl"), stop=5)
    assert skipped == 0 and len(prompts) == 5 and prompts[0]["prompt"][0]["role"] == "user"


def test_rows_without_an_answer_are_skipped_and_counted(env, caplog):
    prompts, skipped = gsm8k_prompts("main", "train", source=env["data"])
    assert (len(prompts), skipped) == (8, 1) and "skipped 1 of 9 rows" in caplog.text
    assert all(extract_answer(a) == "12" for a in prompts["answer"])


# -- the tool inside rollouts ------------------------------------------------------------------------------------------


def test_tool_errors_loops_and_floods_are_contained(env):
    tok, call = env["tok"], env["call"]
    sp = get_special_token_ids(tok)
    model = HFNanoChatForCausalLM.from_pretrained(env["model"]).eval()
    prompt = [sp["bos"], sp["user_start"], *tok.encode("hi", add_special_tokens=False), sp["user_end"], call[0]]

    def forced_text(tool):
        (c,) = Engine(model, tok, tool=tool).generate_batch(prompt, max_new_tokens=40, temperature=0.0)
        forced = [t for t, m in zip(c.tokens, c.mask, strict=True) if m == 0]
        assert forced[0] == sp["output_start"] and forced[-1] == sp["output_end"]
        return tok.decode(forced[1:-1])

    assert forced_text(calculator) == "12"

    def boom(expr):
        raise RuntimeError("tool crashed")

    assert forced_text(boom) == "error: RuntimeError: tool crashed"
    assert forced_text(lambda expr: "9" * 5000).startswith("error: output of")  # a flood becomes one short line
    assert len(tok.encode("9" * 5000)) > MAX_TOOL_OUTPUT_TOKENS
    # the calculator itself: refusals explain themselves, nothing it accepts can loop or blow up
    assert calculator_with_errors("3/0") == "error: division by zero"
    assert calculator_with_errors("2**99999999") == "error: ** is not allowed"
    assert calculator_with_errors("9" * 20 + "*9") == "error: a number beyond 1e15"
    assert calculator_with_errors("(" * 5000 + "1" + ")" * 5000).startswith("error: ")
    assert calculator_with_errors("__import__('os')") == "error: only arithmetic or 'text'.count('x')"
    assert calculator_with_errors("12*7") == "84" and calculator("3/0") is None


def test_rollout_func_contract_and_masks(env):
    """What TRL's `_generate` receives: one completion per prompt entry, the forced tokens and the stop token at 0."""
    tok = env["tok"]
    model = HFNanoChatForCausalLM.from_pretrained(env["model"]).train()
    rollout = EngineRollout(tok, max_new_tokens=16, prompts_per_call=2)
    a, b = [{"role": "user", "content": "ka lo?"}], [{"role": "user", "content": "mi ne ru?"}]

    class Trainer:  # the three attributes rollout_func reads: the real accelerator, a step, the model
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        state = type("State", (), {"global_step": 3})()
        model_wrapped = model

    out = rollout([a] * 3 + [b] * 3, Trainer)
    assert set(out) == {"prompt_ids", "completion_ids", "logprobs", "env_mask"} and out["logprobs"] is None
    assert len(out["completion_ids"]) == len(out["env_mask"]) == 6
    sp = get_special_token_ids(tok)
    assert out["prompt_ids"][0][-1] == sp["assistant_start"] and out["prompt_ids"][0] != out["prompt_ids"][3]
    tool_rows = 0
    for ids, mask in zip(out["completion_ids"], out["env_mask"], strict=True):
        assert len(ids) == len(mask)
        for i, t in enumerate(ids):
            if t == sp["python_end"] and mask[i] and i + 1 < len(ids):  # the call ran: its output is forced, mask 0
                tool_rows += 1
                assert ids[i + 1] == sp["output_start"] and mask[i + 1 : i + 4] == [0, 0, 0]
        if ids[-1] == sp["assistant_end"]:
            assert mask[-1] == 0  # the stop token is not trained (nanochat drops it)
    assert tool_rows >= 3 and rollout.stats["tool_calls"] >= 3 and rollout.stats["rollouts"] == 6
    assert model.training  # the rollout puts the model back in train mode
    assert runs([1, 1, 2, 2, 2, 1]) == [(1, 2), (2, 3), (1, 1)]
    assert call_seed(3, [[1, 2]]) == call_seed(3, [[1, 2]]) != call_seed(4, [[1, 2]])
    assert loss_mask([5, 9], [1, 1], {9}) == [1, 0] and loss_mask([5, 9], [1, 1], {7}) == [1, 1]


# -- TRL computes nanochat's advantage and loss --------------------------------------------------------------------


def nanochat_pass_loss(model, prompt, completions, masks, advantages, num_passes, examples_per_rank):
    """chat_rl.py, independently: one pass = the samples of one prompt, right-padded with <|assistant_end|> (mask 0),
    targets -1 where the mask is 0, loss = -sum(logp * A) / (valid targets * passes * examples per rank)."""
    pad = max(len(c) for c in completions)
    end = 0  # the padding id does not matter: its targets are -1 and it comes after every real token
    ids = torch.tensor([prompt + c + [end] * (pad - len(c)) for c in completions])
    mask = torch.tensor([[0] * len(prompt) + m + [0] * (pad - len(m)) for m in masks])
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    logits = model(input_ids=inputs).logits
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    pg = (logp.view_as(targets) * torch.tensor(advantages)[:, None]).sum()
    num_valid = (targets >= 0).sum()
    return -pg / (num_valid * num_passes * examples_per_rank)


def test_trl_advantage_and_loss_equal_nanochats(env, tmp_path):
    tok = env["tok"]
    sp = get_special_token_ids(tok)
    trainer, *_ = rl.build(rl.parse_args(flags(env, tmp_path / "run")))
    model = trainer.model
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompts = [[{"role": "user", "content": "ka?"}], [{"role": "user", "content": "lo mi ne ru ta shi po?"}]]
    forced = [sp["output_start"], *enc("12"), sp["output_end"]]
    call = [sp["python_start"], *enc("3*4"), sp["python_end"]]
    # per prompt, 4 completions of different lengths: a tool call (forced tokens), right answers, wrong ones, one cut
    # at the length limit (no stop token)
    completions = [
        [*call, *forced, *enc(" so #### 12"), sp["assistant_end"]],
        [*enc("#### 12"), sp["assistant_end"]],
        [*enc("ka lo #### 13"), sp["assistant_end"]],
        [*enc("ka lo mi ne ru ta")],
        [*enc("#### 12"), sp["assistant_end"]],
        [*call, *forced, *enc("#### 11"), sp["assistant_end"]],
        [*enc("po ve dan"), sp["assistant_end"]],
        [*call, *forced, *enc(" #### 12"), sp["assistant_end"]],
    ]
    engine_masks = []
    for c in completions:
        m, inside = [], False
        for t in c:
            inside = inside or t == sp["output_start"]
            m.append(0 if inside else 1)
            inside = inside and t != sp["output_end"]
        engine_masks.append(m)
    stop = {sp["assistant_end"], sp["bos"]}
    env_masks = [loss_mask(c, m, stop) for c, m in zip(completions, engine_masks, strict=True)]
    prompt_ids = [chat_prompt_ids(tok, p) for p in prompts]

    def scripted(prompt_batch, trainer):
        assert prompt_batch == [prompts[0]] * 4 + [prompts[1]] * 4
        return {
            "prompt_ids": [prompt_ids[0]] * 4 + [prompt_ids[1]] * 4,
            "completion_ids": completions,
            "logprobs": None,
            "env_mask": env_masks,
        }

    trainer.rollout_func = scripted
    inputs = [{"prompt": p, "answer": "#### 12"} for p in prompts for _ in range(4)]
    batch = trainer._generate_and_score_completions(inputs)  # TRL's rewards, advantages, padding and masks

    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    advantages = torch.cat([g - g.mean() for g in rewards.view(2, 4)])  # nanochat: r - mean(r), no std
    assert torch.equal(batch["advantages"], advantages)
    assert torch.equal(batch["tool_mask"][0, : len(env_masks[0])], torch.tensor(env_masks[0]))

    # TRL's loss on its two micro-batches (in order: one prompt's 4 samples each, nanochat's passes), accumulated
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    assert trainer.args.gradient_accumulation_steps == 2
    model.train()
    model.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        micro = {k: (v[half] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}
        trainer._compute_loss(model, micro).backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    for k in range(2):
        rows = slice(4 * k, 4 * k + 4)
        nanochat_pass_loss(
            model, prompt_ids[k], completions[rows], env_masks[rows], advantages[rows].tolist(), 1, 2
        ).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(trl_grads[name], p.grad, rtol=1e-4, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in trl_grads.values())


def test_trl_log_probs_keep_the_softcap(env, tmp_path):
    trainer, *_ = rl.build(rl.parse_args(flags(env, tmp_path / "run")))
    model = trainer.model
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 2.0)  # logits of ~±40: the cap at 15 changes them a lot
    ids = torch.randint(0, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as TRL pads prompts
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep=6)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -7:-1]  # the model's own head: lm_head + softcap
    expected = logits.log_softmax(-1).gather(-1, ids[:, -6:, None]).squeeze(-1)
    assert torch.allclose(logps, expected, atol=1e-4)
    uncapped = (model.model(input_ids=ids, attention_mask=mask).last_hidden_state @ model.lm_head.weight.T).float()
    wrong = uncapped[:, -7:-1].log_softmax(-1).gather(-1, ids[:, -6:, None]).squeeze(-1)
    assert (wrong - logps).abs().max() > 1.0  # without the cap the log-probs would be far off


# -- whole runs --------------------------------------------------------------------------------------------------------


def test_grpo_run_with_tool_calls_in_rollouts(env, tmp_path):
    out = tmp_path / "run"
    rl.main(flags(env, out, "--steps", "2", "--eval-every", "2", "--eval-questions", "2", "--eval-samples", "3"))
    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "pass@1" in r]
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    assert all(r["tool_calls"] > 0 and r["rollouts_per_sec"] > 0 for r in steps)
    assert 0 < steps[0]["reward"] < 1  # the groups disagree: a real update
    for r in evals:
        assert r["pass@1"] <= r["pass@2"] <= r["pass@3"]
    before = load_file(Path(env["model"]) / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "final" / "chat_template.jinja").is_file() and (out / "final" / "manifest.json").is_file()


@pytest.mark.slow  # two fresh interpreters over gloo plus a one-process run
def test_two_processes_make_the_update_of_one(env, tmp_path):
    common = flags(env, tmp_path / "x", "--steps", "2", "--prompts-per-call", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = [*common]
    two[two.index("--out") + 1] = str(tmp_path / "two")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(ROOT / "train" / "rl.py"),
            *two,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), gradient accumulation 1" in result.stdout
    one = [*common]
    one[one.index("--out") + 1] = str(tmp_path / "one")
    rl.main(one)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # the same rollouts (seeded per step and prompt) and the same loss: each process's micro-batch is one prompt's
    # samples, as the single process's two micro-batches are
    assert [(r["step"], r["reward"], r["completion_length"]) for r in m1] == [
        (r["step"], r["reward"], r["completion_length"]) for r in m2
    ]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 for a, b in zip(m1, m2, strict=True))
    base = load_file(Path(env["model"]) / "model.safetensors")
    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in base:
        moved = (w1[k] - base[k]).abs().max().item()
        assert moved > 0, k
        # float rounding apart (prompts padded to another width, gradients summed in another order): the same
        # update. AdamW turns last-bit differences of a near-zero gradient into ~1e-3 of a step at the second step
        # (measured: embeddings 5e-5 of 0.05; every Muon matrix < 1e-7 of 1e-4). A micro-batch mixing prompts, or
        # gradients averaged twice, would differ by tens of percent.
        assert (w1[k] - w2[k]).abs().max().item() <= 1e-2 * moved, k


# -- bad input ---------------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_error(env, tmp_path, capsys):
    bare = tmp_path / "bare"
    model = HFNanoChatForCausalLM.from_pretrained(env["model"])
    model.save_pretrained(bare)
    tok = env["tok"]
    template = tok.chat_template
    tok.chat_template = None
    try:
        save_tokenizer(tok, bare)
    finally:
        tok.chat_template = template
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    for extra, message in [
        (["--model", str(bare)], "has no chat template"),
        (["--num-samples", "3"], "not divisible by --device-batch-size"),
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--lr", "1e-5"], "--lr is the --optimizer adamw rate"),
    ]:
        assert run(rl.main, flags(env, tmp_path / "o", *extra)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("optimizer", [[], ["--optimizer", "adamw", "--lr", "1e-3"]], ids=["muon", "adamw"])
def test_resume_continues_the_run_exactly(env, tmp_path, optimizer):
    """Stop after step 1 (its checkpoint), resume: the final weights equal an uninterrupted run's. Rollouts are seeded
    by step and prompt, and the checkpoint holds the optimizer's moments and the schedule."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    rl.main(flags(env, full, "--steps", "2", *optimizer))
    args = flags(env, cut, "--steps", "2", "--save-every", "1", *optimizer)
    rl.main(args)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-2")
    shutil.rmtree(cut / "final")
    rl.main([*args, "--resume"])
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base) for k, base in load_file(Path(env["model"]) / "model.safetensors").items())
    assert [r["step"] for r in metrics(cut)] == [1, 2]
