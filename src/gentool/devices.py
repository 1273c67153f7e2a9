"""Devices and dtypes by name: what `--device` and `--dtype` mean, in one place (torch is imported lazily)."""

from __future__ import annotations

from typing import Any

from gentool.errors import UsageProblem

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}


def resolve_device(device: str) -> str:
    """auto -> cuda when a GPU is there, else cpu; refuses cuda without one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageProblem(f"--device {device} asked for, but no CUDA GPU is available", hint="use --device cpu")
    return device


def torch_dtype(name: str) -> Any:
    """The torch dtype of a name in DTYPE_ALIASES (UsageProblem otherwise)."""
    import torch

    if name not in DTYPE_ALIASES:
        raise UsageProblem(f"unknown --dtype {name!r}", hint="use float32, bfloat16 or float16")
    return getattr(torch, DTYPE_ALIASES[name])


def resolve_dtype(dtype: str | None, device: str) -> Any:
    """--dtype, defaulting to bfloat16 on a GPU and float32 on a CPU."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch_dtype(dtype)


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")
