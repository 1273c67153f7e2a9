"""`gentool import-gguf` and `gentool export-gguf`: llama.cpp's GGUF files in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import Force, Json, NoVerify, Output, examples

AdapterOf = Annotated[Optional[Path], typer.Option("--adapter-of", help="The file is a LoRA adapter of this base "
                                                                        "checkpoint (llama.cpp's --lora format).")]


def import_gguf(
    model: Annotated[Path, typer.Argument(help="A llama-architecture .gguf file.")],
    output: Output,
    adapter_of: AdapterOf = None,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Convert a llama.cpp GGUF file into an lm-checkpoint.

    Every block type the gguf package reads is dequantized to float32; llama.cpp's q/k row permutation is undone;
    the tokenizer is rebuilt from the GGUF metadata (SentencePiece tokenizer.model or byte-level BPE
    tokenizer.json, with the chat template). The result loads in sample, perplexity and transformers.
    With --adapter-of BASE the file is a GGUF LoRA adapter of BASE (llama.cpp's --lora format), written as a
    lora-adapter in PEFT's layout.
    """
    from gentool import console

    if adapter_of is not None:
        from gentool.adapters.gguf_lora import import_adapter

        console.emit(import_adapter(model, adapter_of, output, force=force), as_json=json_)
        return
    from gentool.gguf import import_gguf as run

    manifest = run(model, output, force=force)
    console.log(f"wrote {output}")
    console.emit(manifest.to_dict() if json_ else {"output": str(output), **manifest.contents}, as_json=json_)


import_gguf.epilog = examples("gentool import-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2",
                              "gentool import-gguf model.gguf -o ckpt --json",
                              "gentool import-gguf lora.gguf --adapter-of runs/base -o runs/adapter")


def export_gguf(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint or Hugging Face Llama directory (a LoRA adapter "
                                                    "with --adapter-of).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .gguf file.")],
    type_: Annotated[str, typer.Option("--type", help="Weight type: f32, f16, q8_0 or q4_0 (norms stay f32; rows "
                                                      "not divisible by 32 fall back to f16; f32 or f16 for "
                                                      "adapters).")] = "f16",
    adapter_of: AdapterOf = None,
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Write a checkpoint as a GGUF file that llama.cpp runs.

    Tensor names, the q/k permutation, hyper-parameters and the tokenizer follow llama.cpp's conventions;
    Q8_0 and Q4_0 use llama.cpp's block layouts. With --adapter-of BASE, CHECKPOINT is a LoRA adapter of BASE
    and the output a GGUF LoRA adapter for llama.cpp's --lora (rsLoRA and alpha patterns folded into B).
    """
    from gentool import console

    if adapter_of is not None:
        from gentool.adapters.gguf_lora import export_adapter as run
    else:
        from gentool.gguf import export_gguf as run
    kw = {"base_path": adapter_of} if adapter_of is not None else {}
    result = run(checkpoint, output, qtype=type_, force=force, verify=not no_verify, **kw)
    console.log(f"wrote {output}")
    console.emit(result, as_json=json_)


export_gguf.epilog = examples("gentool export-gguf runs/lm -o lm.gguf --type q8_0",
                              "gentool export-gguf smollm2 -o smollm2-f16.gguf",
                              "gentool export-gguf runs/adapter --adapter-of runs/base -o adapter.gguf")
