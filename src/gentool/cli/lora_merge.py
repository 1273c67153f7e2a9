"""`gentool lora-merge`: fold LoRA adapters into a base checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import Force, Json, NoVerify, Output, examples


def lora_merge(
    base: Annotated[Path, typer.Argument(help="Base lm-checkpoint or Hugging Face Llama directory.")],
    adapters: Annotated[list[str], typer.Argument(
        help="Adapter directories (gentool lora-adapter or PEFT), each optionally with a weight: DIR:0.5.")],
    output: Output,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="float32, bfloat16 or float16 for the output (default: each tensor keeps the base's "
                        "dtype).")] = None,
    ignore_base_mismatch: Annotated[bool, typer.Option(
        "--ignore-base-mismatch", help="Merge even when the base's sha256 differs from the adapter's base "
                                       "(shapes must still fit).")] = False,
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Merge LoRA adapters into a base: W' = W + Σ w·s·B A, in float32.

    Reads gentool's lora-adapter artifacts and adapters saved by Hugging Face PEFT (LoRA, rsLoRA, rank/alpha
    patterns, modules_to_save, DoRA). Writes an lm-checkpoint in the base's dtype (or --dtype) that
    transformers.LlamaForCausalLM loads. Refuses, before any work, adapters whose base, shapes or tensors do not
    fit, and PEFT options it does not implement (fan_in_fan_out, trained biases, other adapter types).
    """
    from gentool import console
    from gentool.adapters import merge_checkpoint
    from gentool.devices import resolve_dtype

    torch_dtype = resolve_dtype(dtype, "cpu") if dtype is not None else None
    result = merge_checkpoint(base, adapters, output, dtype=torch_dtype, force=force,
                              ignore_base_mismatch=ignore_base_mismatch, verify=not no_verify)
    console.log(f"wrote {output}")
    console.emit(result, as_json=json_, title="lora-merge")


lora_merge.epilog = examples(
    "gentool lora-merge runs/base runs/adapter -o runs/merged",
    "gentool lora-merge runs/base style:0.7 topic:0.3 -o runs/mix --dtype bfloat16",
    "gentool lora-merge hf-llama/ peft-adapter/ -o merged --json",
)
