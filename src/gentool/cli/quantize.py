"""`gentool quantize`: int8 / int4 / NF4 / FP8 weight quantization of an LM checkpoint, with a damage report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import Device, Dtype, Force, Json, NoVerify, Output, examples


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def quantize(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint or Hugging Face Llama directory (a "
                                                    "quantized-checkpoint with --dequantize).")],
    output: Output,
    scheme: Annotated[Optional[str], typer.Option(help="int8 (per-channel, symmetric), int4 (groups, "
                                                       "asymmetric), nf4 (QLoRA NormalFloat, double-quantized "
                                                       "scales) or fp8 (e4m3, row-wise scales).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="int4 group size along the input dimension: 32, 64 "
                                                           "or 128 (default 128: 4.25 bits per weight).")] = None,
    skip: Annotated[str, typer.Option(help="Comma-separated module names or globs kept in 16-bit (default: the "
                                           "embeddings and the output head).")] = "embed_tokens,lm_head",
    keep_16bit: Annotated[Optional[str], typer.Option("--keep-16bit", help="Transformer blocks kept in 16-bit: "
                                                      "first, last or layer numbers, e.g. first,last.")] = None,
    dequantize: Annotated[bool, typer.Option(help="Write a plain LM checkpoint: a quantized checkpoint "
                                                  "dequantized, or the base quantized and dequantized.")] = False,
    eval_: Annotated[Optional[list[str]], typer.Option("--eval", help="Measure the damage on this data: token "
                                                       "shards (see --split) or text files (repeatable).")] = None,
    split: Annotated[str, typer.Option(help="Split of token shards for --eval.")] = "val",
    window: Annotated[Optional[int], typer.Option(help="--eval context window (default: the model's).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="--eval at most this many tokens.")] = None,
    batch_size: Annotated[int, typer.Option(help="--eval windows per forward pass.")] = 8,
    device: Device = "cpu",
    dtype: Dtype = None,
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Quantize an LM checkpoint's weights (data-free) and report the damage.

    Writes a quantized-checkpoint: config.json with a quantization_config block, model.safetensors with the codes
    and their scales (`<name>.weight`, `<name>.weight_scale`, ...), the tokenizer and a manifest with the scheme,
    the tensors quantized and kept, bits per weight, size and the base's sha256. `sample`, `perplexity` and LoRA
    fine-tuning load it directly. Embeddings and the output head stay 16-bit by default (--skip). With --eval,
    base and quantized model are compared on the same tokens: perplexity and its change, mean and 99th-percentile
    KL divergence of the next-token distributions, top-1 agreement (llama.cpp's figures). --device and --dtype
    apply to --eval.
    """
    from gentool import console
    from gentool.devices import resolve_device, resolve_dtype
    from gentool.quantize import quantize_checkpoint

    dev = resolve_device(device)
    result = quantize_checkpoint(
        checkpoint, output, scheme=scheme, group_size=group_size, skip=_csv(skip), keep_16bit=_csv(keep_16bit),
        dequantize=dequantize, eval_data=eval_, force=force, verify=not no_verify,
        eval_options={"split": split, "window": window, "max_tokens": max_tokens, "batch_size": batch_size,
                      "device": dev, "dtype": resolve_dtype(dtype, dev)})
    console.emit(result, as_json=json_, title="quantize")


quantize.epilog = examples("gentool quantize runs/lm --scheme int8 -o runs/lm-int8",
                           "gentool quantize runs/lm --scheme int4 --group-size 64 -o runs/lm-q4 --eval tokens",
                           "gentool quantize runs/lm --scheme fp8 --keep-16bit first,last -o runs/lm-fp8 --json",
                           "gentool quantize runs/lm-q4 --dequantize -o runs/lm-q4-deq",
                           "gentool perplexity runs/lm-q4 tokens --reference runs/lm")
