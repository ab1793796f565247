"""The correctness check of bench/speed.py: the fast paths the benches time give the plain model's numbers.

    python bench/gpu_check.py                       # one GPU: decode at d20, training losses at d4, vocab 65,536
    python bench/gpu_check.py --device cpu --depth 2 --train-depth 2 --vocab-size 512 --seq-len 64   # smoke run

The CPU tests compare every fast path with the plain model on tiny shapes; this runs the same comparisons on the GPU at
the benches' shapes, where the kernels, the compiler's code and the attention backends differ from the CPU's:

- decode: `Engine` (static cache, compiled step, CUDA graphs, `fast_decode`'s Triton kernels) against greedy decoding
  by the plain model's forward over the whole sequence, batch 1 and a batch of left-padded prompts, in fp32 with TF32
  off (the kernels and graphs the benches time in bf16, at a precision where the reference's tokens are exact). A
  row's tokens must equal the reference's up to the first step whose two best reference logits lie within --tie of
  each other (there either token is a right answer). In bf16 both sides round differently and part ways within a
  few tokens at near ties (one run at batch 8: 0 to 24 of 24 tokens equal), too loose a check to keep;
- training: the loss and gradient norm of the pretraining step (the model compiled whole, chunked loss) and of the
  SFT stages (the decoder stack compiled, TRL's fused LM head) against the eager model with full logits, bf16
  autocast over fp32 weights, at nanochat's 65,536-token vocabulary (where TRL's head compiled inside the graph once
  gave a NaN loss at d12 and crashed at d20). Depth 4 by default: a layer more compiles the same code again.

Weights are nanochat's initialisation with the zero-initialised output projections and head drawn like the other
matrices, so that every layer and every logit matters (with the zero head all logits tie). One JSON line per
comparison; exits non-zero if any fails.
"""

import argparse
import json
import math
import sys

import torch

from hfnanochat import HFNanoChatForCausalLM, config_for_depth
from hfnanochat.inference.engine import Engine
from hfnanochat.training.metrics import peak_memory_gib
from hfnanochat.training.sft import compile_backbone


def checked_model(depth: int, vocab_size: int, seq_len: int, device, seed: int = 0) -> HFNanoChatForCausalLM:
    """nanochat's init, then output projections and head drawn as N(0, 1/fan_in) so none of them is zero."""
    torch.manual_seed(seed)
    model = HFNanoChatForCausalLM.from_config_on_device(config_for_depth(depth, vocab_size, seq_len), device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(std=module.weight.shape[1] ** -0.5)
    return model.eval()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from the plain forward over the whole sequence at every step (no cache, no fast path), and at
    each step the gap between the two best logits."""
    ids = torch.tensor([prompt], device=model.device)
    tokens, gaps = [], []
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
        top = logits.topk(2)
        tokens.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return tokens, gaps


def agreement(ours: list[int], reference: list[int], gaps: list[float], tie: float) -> tuple[int, bool]:
    """(tokens equal before the first difference, whether that difference is allowed): a row may leave the reference
    only where the reference's two best logits are within `tie` (a near tie, where rounding picks either)."""
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i, gaps[i] < tie
    return min(len(ours), len(reference)), len(ours) == len(reference)


def check_decode(model, batch: int, prompt_len: int, new_tokens: int, tie: float, compile: bool) -> dict:
    generator = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    # left padding in the batch: the rows' lengths differ (the first has the full length)
    lengths = [prompt_len - (7 * i) % (prompt_len // 2) for i in range(batch)]
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    engine = Engine(model, cache_implementation="static" if compile else None, compile=compile)
    ours = [samples[0].tokens for samples in engine.generate_batch(prompts, max_new_tokens=new_tokens, temperature=0.0)]
    equal, ok = [], True
    for prompt, tokens in zip(prompts, ours):
        reference, gaps = reference_greedy(model, prompt, new_tokens)
        n, allowed = agreement(tokens, reference, gaps, tie)
        equal.append(n)
        ok &= allowed
    return {"check": "decode", "dtype": str(model.dtype).removeprefix("torch."), "batch": batch,
            "new_tokens": new_tokens, "tokens_equal_per_row": equal, "ok": ok}  # fmt: skip


def loss_and_grad_norm(model, call, ids: torch.Tensor, **kwargs) -> tuple[float, float]:
    """The loss of predicting ids[:, 1:] from ids[:, :-1] through `call`, and the norm of all gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = call(input_ids=ids[:, :-1], shift_labels=ids[:, 1:], **kwargs).loss
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return float(loss.detach()), float(norm)


def check_training(depth, vocab_size, seq_len, rows, device, compile: bool, tolerance: float) -> list[dict]:
    from trl.trainer.utils import add_fused_lm_head

    model = checked_model(depth, vocab_size, seq_len, device).train()
    ids = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=torch.Generator().manual_seed(1)).to(device)
    eager = loss_and_grad_norm(model, model, ids)
    results = []

    def compare(path, got):
        loss_diff, norm_diff = abs(got[0] - eager[0]), abs(got[1] - eager[1]) / eager[1]
        ok = all(map(math.isfinite, got)) and loss_diff <= tolerance and norm_diff <= tolerance
        results.append({"check": "training", "path": path, "depth": depth, "vocab": vocab_size, "rows": rows,
                        "seq_len": seq_len, "loss": got[0], "eager_loss": eager[0], "grad_norm": got[1],
                        "eager_grad_norm": eager[1], "ok": ok})  # fmt: skip

    # pretraining: train/pretrain.py compiles the whole model and trains with the chunked head + loss
    pretrain_call = torch.compile(model, dynamic=False) if compile else model
    compare("pretraining (compiled, loss chunks of 8192)", loss_and_grad_norm(model, pretrain_call, ids,
                                                                             loss_chunk_size=8192))  # fmt: skip
    # SFT stages: the decoder stack compiled in place, TRL's fused head on top
    add_fused_lm_head(model)
    if compile:
        compile_backbone(model)
    compare("SFT stages (compiled decoder stack, TRL's fused head)", loss_and_grad_norm(model, model, ids,
                                                                                     fused_lm_head=True))  # fmt: skip
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20, help="decode check depth")
    p.add_argument("--train-depth", type=int, default=4, help="training check depth")
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=2048, help="training rows' length")
    p.add_argument("--rows", type=int, default=4, help="training rows")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=8, help="the batched decode check's rows")
    p.add_argument("--tie", type=float, default=1e-3, help="decode: the logit gap below which two tokens tie")
    p.add_argument("--tolerance", type=float, default=0.02, help="training: |loss diff| and grad-norm relative diff")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    compile = device.type == "cuda"  # what the stages do: compiled on CUDA only
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in full fp32
    results = []
    model = checked_model(args.depth, args.vocab_size, args.prompt_len + args.new_tokens, device)
    for batch in (1, args.batch):  # batch 1 runs the GEMV kernels, a batch cuBLAS and the batched attention kernel
        results.append(check_decode(model, batch, args.prompt_len, args.new_tokens, args.tie, compile))
        torch._dynamo.reset()  # each configuration compiles its own graphs, as a fresh process would
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results += check_training(args.train_depth, args.vocab_size, args.seq_len, args.rows, device, compile,
                              args.tolerance)  # fmt: skip
    for row in results:
        print(json.dumps({**row, "peak_mem_gib": peak_memory_gib(device)}), flush=True)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
