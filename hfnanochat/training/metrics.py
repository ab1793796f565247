"""What the training logs need: the GPUs' peak FLOP/s for MFU (achieved training FLOP/s over the dense bf16 peak,
nanochat's table), the process's peak GPU memory, and the `metrics.jsonl` bookkeeping shared by every stage."""

import json
from pathlib import Path

import torch

# bf16 dense peak FLOP/s per GPU; the more specific names first (an "H100 PCIe" also contains "H100")
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2.25e15}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device, None on CPU or an unknown GPU (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device | str | None = None) -> float | None:
    """The most GPU memory this process's tensors have held on `device` (the current one by default), in GiB, since the
    process started or `torch.cuda.reset_peak_memory_stats`; None off CUDA. The allocator's own bookkeeping: no sync."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def append_jsonl(path: str | Path, record: dict) -> None:
    """One JSON object as one line at the end of `path` (metrics logs, benchmark results)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step`: the steps after it, logged before a crash (or by an earlier run into the
    same folder), are about to be redone. A last line cut short by the crash does not parse and goes too."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue
    path.write_text("".join(kept))
