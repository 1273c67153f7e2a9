"""Option types shared by every command, so each means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Output = Annotated[Path, typer.Option("--output", "-o", help="Output artifact directory.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (auto: cuda when available).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: same seed, same result.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 "
                                                               "on GPU, float32 on CPU).")]
NoVerify = Annotated[bool, typer.Option("--no-verify", help="Skip sha256 checks of input files (sizes are "
                                                            "still checked).")]


def examples(*lines: str) -> str:
    """An epilog with runnable examples; `\\b` keeps Click from rewrapping them."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from gentool.errors import UsageProblem

        raise UsageProblem(f"--device {device} asked for, but no CUDA GPU is available", hint="use --device cpu")
    return device


def resolve_dtype(dtype: str | None, device: str):
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        from gentool.errors import UsageProblem

        raise UsageProblem(f"unknown --dtype {dtype!r}", hint="use float32, bfloat16 or float16")
    return table[dtype]
