"""`gentool import-gguf` and `gentool export-gguf`: llama.cpp's GGUF files in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import ADVANCED, Force, Json, NoVerify, Output, examples

AdapterOf = Annotated[Path | None, typer.Option("--adapter-of", help="The file is a LoRA adapter of this base "
                                                                        "checkpoint (llama.cpp's --lora format).")]


def import_gguf(
    model: Annotated[Path, typer.Argument(help="A llama-architecture .gguf file.")],
    output: Output,
    keep_quantized: Annotated[bool, typer.Option(help="Keep the file's blocks (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K) as "
                                                      "they are: a quantized-checkpoint instead of float32.")] = False,
    adapter_of: AdapterOf = None,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Convert a llama.cpp GGUF file into a gentool checkpoint.

    Every block type the gguf package reads is dequantized to float32 (with --keep-quantized the types gentool
    decodes stay as they are, so export-gguf writes them back byte for byte); llama.cpp's q/k row permutation is
    undone; the tokenizer is rebuilt from the GGUF metadata (SentencePiece tokenizer.model or byte-level BPE
    tokenizer.json, with the chat template). The result loads in sample, perplexity and, in float32, transformers.
    With --adapter-of BASE the file is a GGUF LoRA adapter of BASE (llama.cpp's --lora format), written as a
    lora-adapter in PEFT's layout.
    """
    from gentool import console

    if adapter_of is not None:
        from gentool.adapters.gguf_lora import import_adapter

        console.emit(import_adapter(model, adapter_of, output, force=force), as_json=json_)
        return
    from gentool.gguf import import_gguf as run

    manifest = run(model, output, keep_quantized=keep_quantized, force=force)
    console.log(f"wrote {output}")
    console.emit(manifest.to_dict() if json_ else {"output": str(output), **manifest.contents}, as_json=json_)


import_gguf.epilog = examples("gentool import-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2",
                              "gentool import-gguf model-q4_k_m.gguf --keep-quantized -o q4km --json",
                              "gentool import-gguf lora.gguf --adapter-of runs/base -o runs/adapter")


def export_gguf(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint, Hugging Face Llama directory, a "
                                                    "quantized-checkpoint of a GGML scheme, or a LoRA adapter "
                                                    "with --adapter-of.")],
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
    adapter_of: AdapterOf = None,
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Write a checkpoint as a GGUF file that llama.cpp runs.

    Tensor names, the q/k permutation, hyper-parameters and the tokenizer follow llama.cpp's conventions.
    Quantized types follow llama-quantize's per-tensor recipe with its blocks, byte for byte; a quantized-checkpoint
    of a GGML scheme is copied as it is, never re-quantized. With --adapter-of BASE, CHECKPOINT is a LoRA adapter
    of BASE and the output a GGUF LoRA adapter for llama.cpp's --lora (f32 or f16; rsLoRA and alpha folded into B).
    """
    from gentool import console
    from gentool.gguf import export_gguf as run

    if adapter_of is not None:
        from gentool.adapters.gguf_lora import export_adapter

        result = export_adapter(checkpoint, output, qtype=type_ or "f16", force=force, verify=not no_verify,
                                base_path=adapter_of)
    else:
        result = run(checkpoint, output, qtype=type_, tensor_types=tensor_type or (), imatrix=imatrix, force=force,
                     verify=not no_verify)
    console.log(f"wrote {output}")
    console.emit(result, as_json=json_)


export_gguf.epilog = examples("gentool export-gguf runs/lm -o lm.gguf --type q4_k_m",
                              "gentool export-gguf runs/lm-q4km -o lm-q4_k_m.gguf",
                              "gentool export-gguf smollm2 -o smollm2-f16.gguf",
                              "gentool export-gguf runs/adapter --adapter-of runs/base -o adapter.gguf")
