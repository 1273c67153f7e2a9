"""`gentool import-gguf` and `gentool export-gguf`: llama.cpp's GGUF files in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import ADVANCED, Force, Json, NoVerify, Output, examples


def import_gguf(
    model: Annotated[Path, typer.Argument(help="A llama-architecture .gguf file.")],
    output: Output,
    keep_quantized: Annotated[bool, typer.Option(help="Keep the file's blocks (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K) as "
                                                      "they are: a quantized-checkpoint instead of float32.")] = False,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Convert a llama.cpp GGUF file into a gentool checkpoint.

    Every block type the gguf package reads is dequantized to float32 (with --keep-quantized the types gentool
    decodes stay as they are, so export-gguf writes them back byte for byte); llama.cpp's q/k row permutation is
    undone; the tokenizer is rebuilt from the GGUF metadata (SentencePiece tokenizer.model or byte-level BPE
    tokenizer.json, with the chat template). The result loads in sample, perplexity and, in float32, transformers.
    """
    from gentool import console
    from gentool.gguf import import_gguf as run

    manifest = run(model, output, keep_quantized=keep_quantized, force=force)
    console.log(f"wrote {output}")
    console.emit(manifest.to_dict() if json_ else {"output": str(output), **manifest.contents}, as_json=json_)


import_gguf.epilog = examples("gentool import-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2",
                              "gentool import-gguf model-q4_k_m.gguf --keep-quantized -o q4km --json")


def export_gguf(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint, Hugging Face Llama directory, or a "
                                                    "quantized-checkpoint of a GGML scheme.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .gguf file.")],
    type_: Annotated[str | None, typer.Option("--type", help="f32, f16 (default) or a llama-quantize type: "
                                                               "q4_k_m, q5_k_m, q6_k, q8_0, q4_0, q4_1, q5_0, q5_1, "
                                                               "q4_k_s, q5_k_s. A GGML quantized-checkpoint keeps "
                                                               "its own.")] = None,
    tensor_type: Annotated[list[str] | None, typer.Option(
        help="PATTERN=TYPE override of llama-quantize's per-tensor type (repeatable).",
        rich_help_panel=ADVANCED)] = None,
    imatrix: Annotated[Path | None, typer.Option(help="Importance matrix (llama.cpp imatrix file) for the "
                                                         "quantized types.", rich_help_panel=ADVANCED)] = None,
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Write a checkpoint as a GGUF file that llama.cpp runs.

    Tensor names, the q/k permutation, hyper-parameters and the tokenizer follow llama.cpp's conventions.
    Quantized types follow llama-quantize's per-tensor recipe with its blocks, byte for byte; a quantized-checkpoint
    of a GGML scheme is copied as it is, never re-quantized.
    """
    from gentool import console
    from gentool.gguf import export_gguf as run

    result = run(checkpoint, output, qtype=type_, tensor_types=tensor_type or (), imatrix=imatrix, force=force,
                 verify=not no_verify)
    console.log(f"wrote {output}")
    console.emit(result, as_json=json_)


export_gguf.epilog = examples("gentool export-gguf runs/lm -o lm.gguf --type q4_k_m",
                              "gentool export-gguf runs/lm-q4km -o lm-q4_k_m.gguf",
                              "gentool export-gguf smollm2 -o smollm2-f16.gguf")
