"""
Muon + AdamW in one optimizer, nanochat's parameter groups, and nanochat's schedules.

Notable:
- ONE `torch.optim.Optimizer` whose param groups carry `kind="muon"|"adamw"` (nanochat 2026 style). A single object is
  what Accelerate's `prepare`, a TRL/transformers `Trainer` (`optimizer_cls_and_kwargs=(MuonAdamWFactory, kw)`),
  LambdaLR (per-group `initial_lr`) and `state_dict()` expect.
- Muon (the seed's recipe by default): Nesterov momentum, then Newton–Schulz quintic (3.4445, -4.7750, 2.0315), 5 steps,
  in bf16 on GPU (fp32 on CPU), on the transposed matrix when rows > cols; update
  `p -= lr * max(1, rows/cols)**0.5 * O`. One group per distinct shape, so the orthogonalisation of all same-shape
  matrices runs as one batched matmul chain.
  `ns_method="polar_express"` swaps in nanochat 2026's Polar Express coefficients (arXiv 2505.16932).
- AdamW is torch's own functional AdamW (fused kernel on CUDA), so its numbers equal `torch.optim.AdamW`.
- Distributed: gradients arrive already averaged (Accelerate/DDP did the all-reduce). Each rank orthogonalises every
  world_size-th matrix of a shape group and the results are all-gathered, so the Newton–Schulz work is done once in the
  world while every rank applies identical updates. All state stays replicated, so rank 0's `state_dict()` is complete.
- Schedules are plain functions of the step (nanochat style): `lr_multiplier`, `muon_momentum`,
  `weight_decay_multiplier`, applied by `apply_schedule`.

Why not `torch.optim.Muon` (torch >= 2.9)? It computes the same seed update (tests/test_optim.py checks this), but it
loops over matrices one at a time (no batching across same-shape matrices), every DDP rank repeats the whole
orthogonalisation (no sharding of the Newton–Schulz work), it has no Polar Express, and it is a second optimizer
object next to AdamW.
"""

import functools
import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adamw import adamw as _functional_adamw

# -----------------------------------------------------------------------------
# Orthogonalisation

# Keller Jordan's quintic: coefficients chosen to maximise the slope at zero, so 5 steps push every singular value into
# roughly [0.7, 1.2] rather than converging exactly to 1 (which does not hurt training).
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (arXiv 2505.16932), the per-step coefficients nanochat 2026 uses (nanochat/optim.py at HEAD).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _ns_dtype(G: torch.Tensor) -> torch.dtype:
    # bf16 on GPUs (the seed's recipe: tensor cores, and Muon tolerates the noise). Elsewhere fp32, as nanochat 2026
    # does when its compute dtype is fp32 (CPU/MPS): CPU bf16 matmuls are slower than fp32 and their rounding would
    # turn last-bit gradient differences (e.g. 1 vs 2 processes summing in another order) into visible ones.
    return torch.bfloat16 if G.is_cuda else torch.float32


def newton_schulz(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The seed's `zeropower_via_newtonschulz5`: batched over leading dims, bf16 on GPU (fp32 on CPU)."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    X = G.to(_ns_dtype(G))
    if G.size(-2) > G.size(-1):  # iterate on the wide orientation: X Xᵀ is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm bounds the spectral norm: all σ ≤ 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def polar_express(G: torch.Tensor, steps: int) -> torch.Tensor:
    """nanochat 2026's Polar Express orthogonalisation: batched, bf16 on GPU (fp32 on CPU)."""
    X = G.to(_ns_dtype(G))
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # 1.01 safety margin: bf16 norm may undershoot
    if G.size(-2) > G.size(-1):  # tall: the Gram matrix XᵀX is the smaller one
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X


ORTHOGONALIZERS = {"newton_schulz": newton_schulz, "polar_express": polar_express}


@functools.cache
def _compiled_orthogonalizer(method: str):
    # Compiled lazily on the first CUDA step (importing this module never compiles). Shapes are left to torch's
    # automatic dynamic mode: a model has a few matrix shapes and, under DDP, a per-rank slice of each stack, and
    # static shapes (nanochat's dynamic=False) would exhaust dynamo's recompile limit (8 per function) as soon as two
    # models or world sizes meet in one process. The matmuls are cuBLAS calls either way; compile fuses the
    # elementwise work around them. `steps` never changes and the LR/momentum schedules are applied outside this
    # function, so schedules cause no recompiles.
    return torch.compile(ORTHOGONALIZERS[method])


def orthogonalize(G: torch.Tensor, method: str = "newton_schulz", steps: int = 5) -> torch.Tensor:
    """Approximate U Vᵀ of every matrix in `G` (shape (..., rows, cols)). torch.compile-d on CUDA only: on CPU
    the compile time would dwarf the work (tests, tiny models)."""
    fn = _compiled_orthogonalizer(method) if G.is_cuda else ORTHOGONALIZERS[method]
    return fn(G, steps)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same call); older torch only has the former.
# Both take a flat (world * n, ...) output and work on gloo and NCCL.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -----------------------------------------------------------------------------
# The optimizer

MUON_DEFAULTS = dict(momentum=0.95, nesterov=True, ns_method="newton_schulz", ns_steps=5, weight_decay=0.0)
ADAMW_DEFAULTS = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for 2-D hidden matrices and AdamW for everything else, in one optimizer.

    `param_groups`: dicts with `params`, `kind` ("muon" or "adamw") and `lr`; any other key falls back to
    `MUON_DEFAULTS` / `ADAMW_DEFAULTS`. A Muon group must hold 2-D parameters of one shape (they are stacked).
    Every group also records `initial_lr` (and Muon groups `initial_weight_decay`) for the schedules.

    Muon step per group: `buf.lerp_(g, 1 - momentum)`; with nesterov `u = g.lerp(buf, momentum)` else `u = buf`;
    `O = orthogonalize(u)`; `p *= 1 - lr * weight_decay` (decoupled, unscaled lr, as torch.optim.Muon);
    `p -= lr * max(1, rows/cols)**0.5 * O`. AdamW step: torch's functional AdamW (bias-corrected, decoupled decay).
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        kind = group.get("kind")
        if kind not in ("muon", "adamw"):
            raise ValueError(f"every MuonAdamW param group needs kind='muon' or kind='adamw', got kind={kind!r}")
        if "lr" not in group:
            raise ValueError(f"a {kind} param group has no 'lr'")
        if group["lr"] < 0:
            raise ValueError(f"learning rate must be >= 0, got {group['lr']}")
        if isinstance(group["params"], torch.Tensor):
            group["params"] = [group["params"]]
        group["params"] = list(group["params"])
        for key, value in (MUON_DEFAULTS if kind == "muon" else ADAMW_DEFAULTS).items():
            group.setdefault(key, value)
        group.setdefault("initial_lr", group["lr"])
        if kind == "muon":
            self._check_muon_group(group)
            group.setdefault("initial_weight_decay", group["weight_decay"])
        else:
            beta1, beta2 = group["betas"]
            if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
                raise ValueError(f"AdamW betas must lie in [0, 1), got {group['betas']}")
        super().add_param_group(group)

    @staticmethod
    def _check_muon_group(group: dict) -> None:
        if group["ns_method"] not in ORTHOGONALIZERS:
            raise ValueError(f"ns_method must be one of {sorted(ORTHOGONALIZERS)}, got {group['ns_method']!r}")
        max_steps = len(POLAR_EXPRESS_COEFFS) if group["ns_method"] == "polar_express" else 100
        if not 1 <= group["ns_steps"] <= max_steps:
            raise ValueError(f"ns_steps for {group['ns_method']} must be in [1, {max_steps}], got {group['ns_steps']}")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"Muon momentum must lie in [0, 1), got {group['momentum']}")
        shapes = {tuple(p.shape) for p in group["params"]}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"a Muon group must hold 2-D parameters of a single shape, got shapes {sorted(shapes)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        # FSDP2 hands us DTensor shards: momentum and the update are elementwise, so they run on the local shards;
        # only the orthogonalisation needs whole matrices (Newton–Schulz of a shard is not a shard of Newton–Schulz).
        sharded = isinstance(params[0], DTensor)
        local = (lambda ts: [t.to_local() for t in ts]) if sharded else (lambda ts: ts)
        grads, bufs_local, params_local = local([p.grad for p in params]), local(bufs), local(params)
        # Momentum is elementwise and cheap, so every rank keeps all buffers (replicated state, complete checkpoints).
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs_local, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs_local, momentum) if group["nesterov"] else bufs_local
        if sharded:
            updates = [
                DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                for u, p in zip(updates, params)
            ]
        ortho = list(self._orthogonalize_shared(torch.stack(updates), group["ns_method"], group["ns_steps"]).unbind(0))
        if sharded:  # back to this rank's rows: Replicate -> Shard is a local slice, no communication
            ortho = [
                DTensor.from_local(o, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
                .redistribute(p.device_mesh, p.placements)
                .to_local()
                for o, p in zip(ortho, params)
            ]
        lr, wd = group["lr"], group["weight_decay"]
        rows, cols = params[0].shape
        if wd != 0:
            torch._foreach_mul_(params_local, 1 - lr * wd)
        # max(1, rows/cols)**0.5: O has entry RMS 1/√rows when tall (c_fc, 4d × d), 1/√cols when wide; this gives both
        # 1/√cols (= 1/√fan_in), so c_fc moves at 2x the nominal lr.
        dtype = params_local[0].dtype
        torch._foreach_add_(params_local, [o.to(dtype) for o in ortho], alpha=-lr * max(1, rows / cols) ** 0.5)

    @staticmethod
    def _orthogonalize_shared(stacked: torch.Tensor, method: str, steps: int) -> torch.Tensor:
        """Orthogonalise a (K, rows, cols) stack; with W ranks, rank r does matrices r, r+W, r+2W, ... and an
        all-gather puts the results back in order on every rank."""
        rank, world = _rank_and_world()
        if world == 1:
            return orthogonalize(stacked, method, steps)
        K = stacked.size(0)
        pad = -K % world  # zero matrices orthogonalise to zero (the norm has +eps), so padding is harmless
        if pad:
            stacked = torch.cat([stacked, stacked.new_zeros(pad, *stacked.shape[1:])])
        mine = orthogonalize(stacked[rank::world].contiguous(), method, steps)
        gathered = mine.new_empty(world * mine.size(0), *mine.shape[1:])
        _all_gather_flat(gathered, mine)
        # gathered[w * n + j] is matrix j * W + w: interleave back to the original order, then drop the padding.
        return gathered.view(world, -1, *mine.shape[1:]).transpose(0, 1).reshape(-1, *mine.shape[1:])[:K]

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fused = all(p.is_cuda for p in params)  # torch._fused_adamw_: one kernel for the whole group
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                # as torch.optim.AdamW: the step counter lives on the GPU for the fused kernel, else on the CPU
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif fused and state["step"].device != p.device:  # a state_dict loaded on the CPU, or the model moved
                state["step"] = state["step"].to(p.device)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _functional_adamw(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=fused or None,  # None: torch picks foreach/for-loop by device, exactly as torch.optim.AdamW does
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


# -----------------------------------------------------------------------------
# nanochat's parameter groups

PARAM_GROUP_KEYS = ("matrix", "embedding", "value_embedding", "lm_head", "scalar")
REQUIRED_GROUP_KEYS = ("matrix", "embedding", "lm_head")


def build_optimizer(
    model: nn.Module,
    *,
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    scalar_lr: float = 0.5,
    weight_decay: float = 0.0,
    adam_betas: tuple[float, float] = (0.8, 0.95),
    ns_method: str = "newton_schulz",
    lr_scale: float = 1.0,
) -> MuonAdamW:
    """nanochat's optimizer for a model exposing `optimizer_param_groups()` and `config.hidden_size`.

    - `matrix` (every 2-D weight in the decoder layers): Muon at `matrix_lr`, momentum 0.95, one group per shape.
      `weight_decay` is decoupled decay on these matrices only (nanochat 2026's meaning; the seed used 0).
    - `lm_head` at `unembedding_lr * s`, `embedding` at `embedding_lr * s`, `value_embedding` at half of that, with
      `s = (hidden_size / 768) ** -0.5` (nanochat tuned the AdamW rates at width 768); betas `adam_betas`, eps 1e-10,
      no weight decay (the seed).
    - `scalar` as nanochat 2026, routed by parameter name: `*resid_lambda*` at `scalar_lr * 0.01` with weight decay 0.05
      (they need ~100x less LR than x0), `*x0_lambda*` at `scalar_lr` with beta1 0.96 (nanochat found a cliff at
      0.98), anything else (smear gate, smear/backout lambdas) at a fixed 0.2.
    - `lr_scale` multiplies every rate except the fixed 0.2 (nanochat 2026 scales LRs by sqrt(batch / 2**19)).
    """
    groups = model.optimizer_param_groups()
    unknown = sorted(set(groups) - set(PARAM_GROUP_KEYS))
    missing = sorted(set(REQUIRED_GROUP_KEYS) - set(groups))
    if unknown or missing:
        raise ValueError(
            f"optimizer_param_groups() keys: unknown {unknown}, missing {missing}; expected {list(PARAM_GROUP_KEYS)}"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    owner = {}
    for key, params in groups.items():
        for p in params:
            if id(p) in owner:
                raise ValueError(
                    f"parameter {names.get(id(p), tuple(p.shape))} is in both the "
                    f"'{owner[id(p)]}' and '{key}' optimizer groups"
                )
            owner[id(p)] = key
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in owner:
            raise ValueError(f"parameter {name} requires grad but is in no optimizer group")
    # frozen parameters (e.g. under PEFT) are left out: they never get a gradient
    groups = {key: [p for p in groups.get(key, []) if p.requires_grad] for key in PARAM_GROUP_KEYS}

    s = (model.config.hidden_size / 768) ** -0.5
    # the seed's AdamW: shared betas, eps 1e-10, no weight decay; the 2026 scalar groups override betas and decay
    adam = dict(kind="adamw", eps=1e-10, betas=adam_betas, weight_decay=0.0)
    param_groups = [
        dict(adam, name="lm_head", params=groups["lm_head"], lr=unembedding_lr * s * lr_scale),
        dict(adam, name="embedding", params=groups["embedding"], lr=embedding_lr * s * lr_scale),
        dict(adam, name="value_embedding", params=groups["value_embedding"], lr=embedding_lr * s * 0.5 * lr_scale),
    ]
    scalars = defaultdict(list)
    for p in groups["scalar"]:
        name = names.get(id(p), "")
        scalars["resid" if "resid_lambda" in name else "x0" if "x0_lambda" in name else "other"].append(p)
    param_groups += [
        dict(
            adam,
            name="resid_lambdas",
            params=scalars["resid"],
            lr=scalar_lr * 0.01 * lr_scale,
            betas=(0.8, 0.95),
            weight_decay=0.05,
        ),
        dict(
            adam, name="x0_lambdas", params=scalars["x0"], lr=scalar_lr * lr_scale, betas=(0.96, 0.95), weight_decay=0.0
        ),
        dict(adam, name="scalars", params=scalars["other"], lr=0.2, betas=(0.8, 0.95), weight_decay=0.0),
    ]
    by_shape = defaultdict(list)
    for p in groups["matrix"]:
        if p.ndim != 2:
            raise ValueError(f"'matrix' parameter {names.get(id(p), '?')} has shape {tuple(p.shape)}; Muon needs 2-D")
        by_shape[tuple(p.shape)].append(p)
    for shape in sorted(by_shape):
        param_groups.append(
            dict(
                kind="muon",
                name=f"matrix_{shape[0]}x{shape[1]}",
                params=by_shape[shape],
                lr=matrix_lr * lr_scale,
                momentum=0.95,
                nesterov=True,
                ns_method=ns_method,
                ns_steps=5,
                weight_decay=weight_decay,
            )
        )
    return MuonAdamW([g for g in param_groups if g["params"]])


class MuonAdamWFactory:
    """For `Trainer(optimizer_cls_and_kwargs=(MuonAdamWFactory, build_optimizer_kwargs))` (transformers/TRL): a class
    that is not an Optimizer is instantiated with no arguments and then called with `(model, **kwargs)`. The
    per-group rates come from `build_optimizer`; `TrainingArguments.learning_rate` is not used."""

    def __call__(self, model: nn.Module, **kwargs) -> MuonAdamW:
        return build_optimizer(model, **kwargs)


# -----------------------------------------------------------------------------
# Schedules (functions of the step; nanochat sets group["lr"] by hand each step instead of using scheduler objects)


def lr_multiplier(
    step: int, num_iterations: int, warmup_steps: int = 0, warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0
) -> float:
    """nanochat's LR multiplier: linear warm-up over `warmup_steps`, flat, then linear warm-down over the last
    `warmdown_ratio` of the steps to `final_lr_frac`. Seed: no warm-up, last 20% to 0 (d20: flat through step 17,120
    of 21,400). 2026: warm-up 40 steps, last 65% to 0.05."""
    if num_iterations <= 0:
        raise ValueError(f"num_iterations must be positive, got {num_iterations}")
    if not 0 <= step <= num_iterations:
        raise ValueError(f"step must be in [0, num_iterations={num_iterations}], got {step}")
    if not 0.0 <= warmdown_ratio <= 1.0:
        raise ValueError(f"warmdown_ratio must be in [0, 1], got {warmdown_ratio}")
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / warmdown_steps
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """The seed's Muon momentum: linear from 0.85 to 0.95 over the first 300 steps, then constant."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """nanochat 2026's cosine decay of the Muon weight decay, from 1 at step 0 to 0 at the last step."""
    if num_iterations <= 0:
        raise ValueError(f"num_iterations must be positive, got {num_iterations}")
    return 0.5 * (1 + math.cos(math.pi * step / num_iterations))


def apply_schedule(
    optimizer: torch.optim.Optimizer,
    step: int,
    num_iterations: int,
    *,
    warmup_steps: int = 0,
    warmdown_ratio: float = 0.2,
    final_lr_frac: float = 0.0,
    momentum_warmup_steps: int = 300,
    momentum_start: float = 0.85,
    momentum_end: float = 0.95,
) -> dict[str, float]:
    """Set every group's lr to `initial_lr * lr_multiplier(step)`, and on Muon groups the momentum and the weight decay
    (`initial_weight_decay * weight_decay_multiplier(step)`; a no-op at the seed's 0). Works on an Accelerate-wrapped
    optimizer too (it only touches `param_groups`). Returns the values, for logging."""
    lrm = lr_multiplier(step, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac)
    momentum = muon_momentum(step, momentum_warmup_steps, momentum_start, momentum_end)
    wdm = weight_decay_multiplier(step, num_iterations)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = group["initial_weight_decay"] * wdm
    return {"lrm": lrm, "muon_momentum": momentum, "wdm": wdm}
