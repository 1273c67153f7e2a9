"""Option types shared by every command, so each means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ADVANCED = "Advanced"     # rich help panels: the first screen of --help shows the options that matter
RUNTIME = "Runtime"       # where and how fast it runs (device, dtype, compile): never changes results' recipe

Output = Annotated[Path, typer.Option("--output", "-o", help="Output artifact directory.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (auto: cuda when available).",
                                     rich_help_panel=RUNTIME)]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Random seed: same seed, same result.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 "
                                                               "on GPU, float32 on CPU).", rich_help_panel=RUNTIME)]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model (pays off on a GPU).",
                                       rich_help_panel=RUNTIME)]
LogTo = Annotated[Optional[list[str]], typer.Option(
    "--log-to", help="Also log to tensorboard, wandb, mlflow or trackio (repeatable; local or offline by default).",
    rich_help_panel=RUNTIME)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in OUTPUT.partial/.")]
SaveMinutes = Annotated[float, typer.Option("--save-minutes", min=0, help="Also save resumable state when this many "
                                            "minutes passed since the last save (0: off).", rich_help_panel=ADVANCED)]
NoVerify = Annotated[bool, typer.Option("--no-verify", help="Skip sha256 checks of input files (sizes are "
                                                            "still checked).", rich_help_panel=ADVANCED)]


def examples(*lines: str) -> str:
    """An epilog with runnable examples; `\\b` keeps Click from rewrapping them."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
