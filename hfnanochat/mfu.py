"""Model FLOPs utilisation: achieved training FLOP/s over the hardware's dense bf16 peak (nanochat's table)."""

import torch

# bf16 dense peak FLOP/s per GPU; the more specific names first (an "H100 PCIe" also contains "H100")
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2.25e15}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device, None on CPU or an unknown GPU (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
