"""Tests for hfnanochat.training.optim: Muon against torch.optim.Muon, AdamW against torch.optim.AdamW, nanochat's
groups and schedules, exact resume, the 2-process (gloo) sharded orthogonalisation, and the Trainer factory hook."""

import io
import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hfnanochat.training.optim import (
    MuonAdamW,
    MuonAdamWFactory,
    apply_schedule,
    build_optimizer,
    lr_multiplier,
    muon_momentum,
    orthogonalize,
    weight_decay_multiplier,
)


@dataclass
class TinyConfig:
    hidden_size: int = 32


class TinyLM(nn.Module):
    """A small nanochat-shaped LM (norm after the embedding, x0/resid lambdas, smear, a value embedding, ReLU² MLP,
    untied head) exposing the `optimizer_param_groups()` interface of the real model."""

    def __init__(self, vocab=48, hidden=32, n_layer=2):
        super().__init__()
        self.config = TinyConfig(hidden)
        self.wte = nn.Embedding(vocab, hidden)
        self.value_embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    c_q=nn.Linear(hidden, hidden, bias=False),
                    c_fc=nn.Linear(hidden, 2 * hidden, bias=False),
                    c_proj=nn.Linear(2 * hidden, hidden, bias=False),
                )
            )
            for _ in range(n_layer)
        )
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((n_layer,), 0.1))
        self.smear_gate = nn.Linear(4, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def optimizer_param_groups(self):
        return {
            "matrix": [p for layer in self.layers for p in layer.parameters()],
            "embedding": [self.wte.weight],
            "value_embedding": [self.value_embed.weight],
            "lm_head": [self.lm_head.weight],
            "scalar": [self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda],
        }

    def forward(self, input_ids, labels=None):
        def norm(t):
            return F.rms_norm(t, (t.size(-1),))

        x = norm(self.wte(input_ids))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :4]))
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0 = x
        for i, layer in enumerate(self.layers):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = x + layer["c_q"](norm(x)) + (self.value_embed(input_ids) if i == 0 else 0)
            x = x + layer["c_proj"](F.relu(layer["c_fc"](norm(x))).square())
        logits = self.lm_head(norm(x))
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def successor_batch(seed, batch=8, seq=12, vocab=48):
    """Next-token task with a learnable rule: each token is followed by (token + 1) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    ids = (start + torch.arange(seq + 1)) % vocab
    return ids[:, :-1], ids[:, 1:]


def train(model, opt, steps, first_step=0, num_iterations=None):
    for step in range(first_step, first_step + steps):
        if num_iterations is not None:
            apply_schedule(opt, step, num_iterations, momentum_warmup_steps=4)
        x, y = successor_batch(step)
        model(x, labels=y)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Muon and AdamW math


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_muon_matches_torch_muon(shape):
    torch.manual_seed(0)
    p0 = torch.randn(shape)
    ours, ref = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt = MuonAdamW([dict(kind="muon", params=[ours], lr=0.02)])
    ref_opt = torch.optim.Muon([ref], lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    for _ in range(4):
        g = torch.randn(shape)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    # torch orthogonalises in bf16, we in fp32 on CPU (bf16 on GPU), so the updates differ by bf16 rounding (torch's
    # is 2-4% from an fp64 Newton–Schulz). A wrong transpose, scale (√2 for tall) or momentum would be off by > 30%.
    delta, ref_delta = ours.detach() - p0, ref.detach() - p0
    assert (delta - ref_delta).norm() / ref_delta.norm() < 0.08


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
def test_orthogonalize_batched(method):
    torch.manual_seed(0)
    G = torch.randn(3, 32, 64) * 5
    O = orthogonalize(G, method)
    assert O.dtype == torch.float32 and O.shape == G.shape  # fp32 on CPU, bf16 on CUDA
    s = torch.linalg.svdvals(O.float())
    assert s.min() > 0.6 and s.max() < 1.25  # quintic NS lands in ~[0.7, 1.2]; Polar Express nearer 1
    assert torch.equal(O, torch.stack([orthogonalize(g, method) for g in G]))  # batching changes nothing
    tall = orthogonalize(G.mT.contiguous(), method)
    assert torch.allclose(tall.float(), O.mT.float(), atol=2e-2)  # tall path: same result, transposed
    assert not orthogonalize(torch.zeros(2, 16, 16), method).isnan().any()  # padding matrices stay zero


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    shapes = [(48, 32), (32,), (4, 4)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = MuonAdamW([dict(kind="adamw", params=ours[:2], **hp), dict(kind="adamw", params=ours[2:], lr=0.3)])
    ref_opt = torch.optim.AdamW(
        [dict(params=ref[:2], **hp), dict(params=ref[2:], lr=0.3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)]
    )
    for _ in range(4):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert opt.param_groups[1]["betas"] == (0.8, 0.95) and opt.param_groups[1]["eps"] == 1e-10  # nanochat defaults


def test_muon_weight_decay_is_decoupled():
    p = nn.Parameter(torch.ones(16, 16))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.1, weight_decay=0.5)])
    p.grad = torch.zeros(16, 16)  # zero gradient: the step is pure decay, p *= 1 - lr * wd
    opt.step()
    assert torch.allclose(p, torch.full((16, 16), 0.95))


def test_invalid_groups_raise():
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[nn.Parameter(torch.ones(2, 2))], lr=0.1)])
    with pytest.raises(ValueError, match="single shape"):
        MuonAdamW([dict(kind="muon", params=[nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 3))], lr=1)])
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(kind="muon", params=[nn.Parameter(torch.ones(4))], lr=0.1)])
    with pytest.raises(ValueError, match="ns_method"):
        MuonAdamW([dict(kind="muon", params=[nn.Parameter(torch.ones(2, 2))], lr=0.1, ns_method="svd")])
    with pytest.raises(ValueError, match="ns_steps"):
        MuonAdamW(
            [dict(kind="muon", params=[nn.Parameter(torch.ones(2, 2))], lr=0.1, ns_method="polar_express", ns_steps=6)]
        )


# -----------------------------------------------------------------------------
# nanochat's groups, training, resume


def test_build_optimizer_groups():
    model = TinyLM(hidden=192)  # s = (192 / 768) ** -0.5 = 2
    opt = build_optimizer(model, lr_scale=0.5)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["lm_head"]["lr"] == pytest.approx(0.004 * 2 * 0.5)
    assert groups["embedding"]["lr"] == pytest.approx(0.2 * 2 * 0.5)
    assert groups["value_embedding"]["lr"] == pytest.approx(0.2 * 2 * 0.5 / 2)
    assert groups["resid_lambdas"]["params"] == [model.resid_lambdas]
    assert groups["resid_lambdas"]["lr"] == pytest.approx(0.5 * 0.01 * 0.5)
    assert groups["x0_lambdas"]["params"] == [model.x0_lambdas] and groups["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert groups["scalars"]["params"] == [model.smear_gate.weight, model.smear_lambda]
    assert groups["scalars"]["lr"] == 0.2  # fixed, as nanochat
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert [g["name"] for g in muon] == ["matrix_192x192", "matrix_192x384", "matrix_384x192"]  # sorted by shape
    assert all(g["lr"] == pytest.approx(0.01) and g["momentum"] == 0.95 and len(g["params"]) == 2 for g in muon)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    covered = [p for g in opt.param_groups for p in g["params"]]
    assert len(covered) == len(list(model.parameters())) == len({id(p) for p in covered})


def test_build_optimizer_rejects_bad_grouping():
    class Missing(TinyLM):
        def optimizer_param_groups(self):
            groups = super().optimizer_param_groups()
            groups["scalar"] = groups["scalar"][:-1]  # smear_lambda in no group
            return groups

    class Twice(TinyLM):
        def optimizer_param_groups(self):
            groups = super().optimizer_param_groups()
            groups["embedding"].append(self.lm_head.weight)
            return groups

    with pytest.raises(ValueError, match="smear_lambda requires grad but is in no optimizer group"):
        build_optimizer(Missing())
    with pytest.raises(ValueError, match="lm_head.weight is in both"):
        build_optimizer(Twice())
    frozen = Missing()
    frozen.smear_lambda.requires_grad_(False)  # a frozen parameter outside the groups is fine
    build_optimizer(frozen)


@pytest.mark.parametrize("ns_method", ["newton_schulz", "polar_express"])
def test_loss_decreases(ns_method):
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(model, ns_method=ns_method)
    x, y = successor_batch(1000)
    before = model(x, labels=y)["loss"].item()
    train(model, opt, 30)
    after = model(x, labels=y)["loss"].item()
    assert before > 3.5 and after < 0.5 * before, (before, after)


def test_state_dict_resume_is_exact():
    torch.manual_seed(0)
    straight = TinyLM()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    opt = build_optimizer(straight)
    train(straight, opt, 6, num_iterations=6)

    first = TinyLM()
    first.load_state_dict(init)
    opt = build_optimizer(first)
    train(first, opt, 3, num_iterations=6)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = TinyLM()
    resumed.load_state_dict(ckpt["model"])
    opt = build_optimizer(resumed)
    opt.load_state_dict(ckpt["optim"])
    train(resumed, opt, 3, first_step=3, num_iterations=6)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# -----------------------------------------------------------------------------
# Schedules


def test_lr_multiplier_seed_d20():
    n = 21_400  # d20: 20 tokens/param x 560,988,160 params / 524,288 tokens per step
    assert lr_multiplier(0, n) == 1.0
    assert lr_multiplier(17_120, n) == 1.0  # last flat step: 21,400 - round(0.2 * 21,400)
    assert lr_multiplier(17_121, n) == pytest.approx(4_279 / 4_280)
    assert lr_multiplier(19_260, n) == pytest.approx(0.5)
    assert lr_multiplier(21_399, n) == pytest.approx(1 / 4_280)
    assert lr_multiplier(n, n) == 0.0


def test_lr_multiplier_2026_shape():
    n = 1000  # nanochat 2026: warm-up 40 steps, warm-down 65% to 5%
    kw = dict(warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)
    assert lr_multiplier(0, n, **kw) == pytest.approx(1 / 40)
    assert lr_multiplier(39, n, **kw) == 1.0
    assert lr_multiplier(350, n, **kw) == 1.0
    assert lr_multiplier(n, n, **kw) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="step"):
        lr_multiplier(n + 1, n)


def test_momentum_and_weight_decay_schedules():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(5000) == pytest.approx(0.95)
    assert weight_decay_multiplier(0, 100) == 1.0
    assert weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert weight_decay_multiplier(100, 100) == pytest.approx(0.0)


def test_apply_schedule_sets_groups():
    opt = build_optimizer(TinyLM(), weight_decay=0.2)
    out = apply_schedule(opt, 90, 100, momentum_warmup_steps=300)  # in the warm-down: lrm = 10/20
    assert out["lrm"] == pytest.approx(0.5)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.5 * g["initial_lr"])
        if g["kind"] == "muon":
            assert g["momentum"] == pytest.approx(0.85 + 0.1 * 90 / 300)
            assert g["weight_decay"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.9)))


# -----------------------------------------------------------------------------
# Distributed: 2 CPU processes on gloo must reproduce the single-process step

DIST_SHAPES = [(32, 64)] * 3 + [(64, 32)] * 2 + [(16, 16)]  # K=3 and K=1 need padding to a multiple of 2


def _dist_problem():
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in DIST_SHAPES + [(48, 32)]]
    grads = [[torch.randn(s, generator=g) for s in DIST_SHAPES + [(48, 32)]] for _ in range(2)]
    by_shape = {}
    for p in params[:-1]:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    groups = [dict(kind="muon", params=ps, lr=0.02) for ps in by_shape.values()]
    opt = MuonAdamW(groups + [dict(kind="adamw", params=params[-1:], lr=0.01)])
    return params, grads, opt


def _run_problem():
    params, grads, opt = _dist_problem()
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt.state_dict()


def _dist_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    params, state = _run_problem()
    # Ownership check: give each rank only the matrices it owns (r, r+2, ...) and NaN elsewhere; the gathered result
    # must still be the full, finite orthogonalisation on both ranks.
    G = torch.randn(5, 16, 24, generator=torch.Generator().manual_seed(1))
    partial = torch.full_like(G, float("nan"))
    partial[rank::2] = G[rank::2]
    shared = MuonAdamW._orthogonalize_shared(partial, "newton_schulz", 5)
    torch.save({"params": params, "state": state, "shared": shared}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other may still be in a collective
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_matches_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single_params, single_state = _run_problem()
    G = torch.randn(5, 16, 24, generator=torch.Generator().manual_seed(1))
    expected_shared = orthogonalize(G)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(out["params"], single_params):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
        for i, s in single_state["state"].items():  # replicated state: every rank holds the full, identical state
            for k, v in s.items():
                assert torch.allclose(out["state"]["state"][i][k], v, atol=1e-6, rtol=0)
        assert torch.equal(out["shared"], expected_shared)


def _fsdp_worker(rank, init_file, out_dir):
    """The same problem with every parameter sharded by FSDP2 (DTensor, rows split over the 2 ranks)."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    holder = nn.Module()
    holder.params = nn.ParameterList(p for p in _dist_problem()[0])
    fully_shard(holder)
    params = list(holder.params)
    by_shape = {}
    for p in params[:-1]:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    opt = MuonAdamW(
        [dict(kind="muon", params=ps, lr=0.02) for ps in by_shape.values()]
        + [dict(kind="adamw", params=params[-1:], lr=0.01)]
    )
    _, grads, _ = _dist_problem()
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.distributed.tensor.distribute_tensor(g.clone(), p.device_mesh, p.placements)
        opt.step()
    torch.save([p.full_tensor().detach() for p in params], f"{out_dir}/fsdp{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_muon_matches_single_process(tmp_path):
    """Under FSDP2 Muon must orthogonalise whole matrices, not each rank's shard."""
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single_params, _ = _run_problem()
    for rank in range(2):
        for a, b in zip(torch.load(tmp_path / f"fsdp{rank}.pt"), single_params):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# transformers Trainer hook


def test_trainer_factory(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = TinyLM()
    before = model.lm_head.weight.detach().clone()
    data = [dict(input_ids=x[0], labels=y[0]) for x, y in (successor_batch(i, batch=1) for i in range(8))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(MuonAdamWFactory, dict(matrix_lr=0.03))
    )
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap AcceleratedOptimizer
    assert isinstance(opt, MuonAdamW)
    assert not torch.equal(model.lm_head.weight, before)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}  # LambdaLR kept our per-group rates
    assert lrs["matrix_32x32"] == pytest.approx(0.03) and lrs["lm_head"] == pytest.approx(0.004 * (32 / 768) ** -0.5)
