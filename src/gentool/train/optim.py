"""AdamW with decay on matrices only; the device peaks MFU is measured against."""

from __future__ import annotations

import torch

from gentool.train.schedules import lr_at  # noqa: F401  (re-exported)


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    device: str = "cpu") -> torch.optim.AdamW:
    """Weight decay on >= 2-D trainable tensors (matrices, embeddings); none on norms and biases; frozen
    parameters (LoRA's base) get no optimizer state at all. Fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # tied weights once
    decay = [p for p in unique if p.dim() >= 2]
    no_decay = [p for p in unique if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=str(device).startswith("cuda"))


def device_peak_flops(device: str) -> float | None:
    """Dense bf16 peak of known accelerators, for MFU (None where unknown, e.g. CPUs)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, peak in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("L40", 181e12),
                      ("4090", 165e12)):
        if key in name:
            return peak
    return None
