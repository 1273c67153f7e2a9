"""`gentool import-gguf` and `gentool export-gguf`: llama.cpp's GGUF files in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import Force, Json, NoVerify, Output, examples


def import_gguf(
    model: Annotated[Path, typer.Argument(help="A llama-architecture .gguf file.")],
    output: Output,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Convert a llama.cpp GGUF file into an lm-checkpoint.

    Every block type the gguf package reads is dequantized to float32; llama.cpp's q/k row permutation is undone;
    the tokenizer is rebuilt from the GGUF metadata (SentencePiece tokenizer.model or byte-level BPE
    tokenizer.json, with the chat template). The result loads in sample, perplexity and transformers.
    """
    from gentool import console
    from gentool.gguf import import_gguf as run

    manifest = run(model, output, force=force)
    console.log(f"wrote {output}")
    console.emit(manifest.to_dict() if json_ else {"output": str(output), **manifest.contents}, as_json=json_)


import_gguf.epilog = examples("gentool import-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2",
                              "gentool import-gguf model.gguf -o ckpt --json")


def export_gguf(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint or Hugging Face Llama directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .gguf file.")],
    type_: Annotated[str, typer.Option("--type", help="Weight type: f32, f16, q8_0 or q4_0 (norms stay f32; rows "
                                                      "not divisible by 32 fall back to f16).")] = "f16",
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Write a checkpoint as a GGUF file that llama.cpp runs.

    Tensor names, the q/k permutation, hyper-parameters and the tokenizer follow llama.cpp's conventions;
    Q8_0 and Q4_0 use llama.cpp's block layouts.
    """
    from gentool import console
    from gentool.gguf import export_gguf as run

    result = run(checkpoint, output, qtype=type_, force=force, verify=not no_verify)
    console.log(f"wrote {output}")
    console.emit(result, as_json=json_)


export_gguf.epilog = examples("gentool export-gguf runs/lm -o lm.gguf --type q8_0",
                              "gentool export-gguf smollm2 -o smollm2-f16.gguf")
