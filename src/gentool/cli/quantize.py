"""`gentool quantize`: gentool's int8/int4/NF4/FP8 or llama.cpp's GGML types, calibration, a damage report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import ADVANCED, Device, Dtype, Force, Json, NoVerify, Output, examples

CALIB, EVAL = "Calibration", "Damage report"


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def quantize(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint or Hugging Face Llama directory (a "
                                                    "quantized-checkpoint with --dequantize).")],
    output: Output,
    scheme: Annotated[str | None, typer.Option(help="int8, int4, nf4, fp8, or a llama.cpp type: q4_k_m, q5_k_m, "
                                                       "q6_k, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q5_k_s, q2_k, "
                                                       "q3_k_s, q3_k_m, q3_k_l, iq4_nl, iq4_xs.")] = None,
    group_size: Annotated[int | None, typer.Option(min=1, help="int4 group size along the input dimension: 32, 64 "
                                                           "or 128 (default 128: 4.25 bits per weight).")] = None,
    method: Annotated[str, typer.Option(help="int4 without data: rtn (round to nearest) or optimized (searched "
                                             "scales and zeros).")] = "rtn",
    calibrate: Annotated[list[str] | None, typer.Option(
        "--calibrate", help="Token shards or text files to calibrate on: an importance matrix for GGML types, "
                            "GPTQ for int4 (repeatable).", rich_help_panel=CALIB)] = None,
    target_kl: Annotated[float | None, typer.Option(min=0, 
        help="Choose per-tensor GGML types for this mean KL on the calibration data, at the smallest size.",
        rich_help_panel=CALIB)] = None,
    calibrate_tokens: Annotated[int, typer.Option(min=1, help="--calibrate on at most this many tokens.",
                                                         rich_help_panel=CALIB)] = 8192,
    calibrate_split: Annotated[str, typer.Option(help="Split of token shards for --calibrate.",
                                                 rich_help_panel=CALIB)] = "train",
    imatrix: Annotated[Path | None, typer.Option(help="A llama.cpp importance-matrix file (GGUF or .dat) "
                                                         "instead of --calibrate.", rich_help_panel=CALIB)] = None,
    tensor_type: Annotated[list[str] | None, typer.Option(
        help="PATTERN=TYPE: GGML type of the tensors whose GGUF name matches the regex, as llama-quantize's "
             "(repeatable; e.g. attn_v=q8_0, output=f16).", rich_help_panel=ADVANCED)] = None,
    output_tensor_type: Annotated[str | None, typer.Option(
        help="GGML type of output.weight (of the tied embedding when there is none), as llama-quantize's; with "
             "gentool's schemes the output head's: int8 (default for int8, int4, nf4), int4, nf4, fp8 or float "
             "(kept 16-bit; fp8's default).",
        rich_help_panel=ADVANCED)] = None,
    token_embedding_type: Annotated[str | None, typer.Option(
        help="GGML type of token_embd.weight, as llama-quantize's.", rich_help_panel=ADVANCED)] = None,
    pure: Annotated[bool, typer.Option(help="No per-tensor mix: every quantized tensor gets the scheme's type, as "
                                            "llama-quantize --pure (shape fallbacks and the type options still "
                                            "apply).", rich_help_panel=ADVANCED)] = False,
    skip: Annotated[str | None, typer.Option(help="Comma-separated module names or globs kept in 16-bit by "
                                                     "gentool's schemes (default: embed_tokens; add lm_head to keep "
                                                     "the output head too).",
                                                rich_help_panel=ADVANCED)] = None,
    keep_16bit: Annotated[str | None, typer.Option("--keep-16bit", help="Transformer blocks kept in 16-bit: "
                                                      "first, last or layer numbers, e.g. first,last.",
                                                      rich_help_panel=ADVANCED)] = None,
    dequantize: Annotated[bool, typer.Option(help="Write a plain LM checkpoint: a quantized checkpoint "
                                                  "dequantized, or the base quantized and dequantized.",
                                             rich_help_panel=ADVANCED)] = False,
    eval_: Annotated[list[str] | None, typer.Option("--eval", help="Measure the damage on this data: token "
                                                       "shards (see --split) or text files (repeatable).",
                                                       rich_help_panel=EVAL)] = None,
    split: Annotated[str, typer.Option(help="Split of token shards for --eval.", rich_help_panel=EVAL)] = "val",
    window: Annotated[int | None, typer.Option(min=2, help="--eval context window (default: the model's).",
                                                  rich_help_panel=EVAL)] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="--eval at most this many tokens.",
                                                      rich_help_panel=EVAL)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="--eval windows per forward pass.", rich_help_panel=EVAL)] = 8,
    protocol: Annotated[str, typer.Option(help="--eval windows: gentool (every token once, sliding) or llama.cpp "
                                               "(its chunks, BOS, second halves scored, its CPU arithmetic).",
                                          rich_help_panel=EVAL)] = "gentool",
    kl_tokens: Annotated[Path | None, typer.Option(help="--eval: write every scored token's KL, NLLs and top-1 "
                                                           "match as JSON lines to this file.",
                                                      rich_help_panel=EVAL)] = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Quantize an LM checkpoint's weights and report the damage.

    Writes a quantized-checkpoint: config.json with a quantization_config block, model.safetensors with the codes
    and their scales, the tokenizer and a manifest with the scheme, the tensors quantized, bits per weight, size
    and the base's id. gentool's schemes keep the input embedding 16-bit and store the output head as int8
    (fp8: 16-bit), as llama-quantize keeps output.weight at higher precision (--output-tensor-type, --skip);
    GGML schemes follow llama-quantize's per-tensor recipe, their blocks are llama-quantize's byte for byte and
    export-gguf copies them. sample, perplexity and LoRA fine-tuning load the result directly. --calibrate runs the model over data
    first (the importance matrix is saved as imatrix.gguf, readable by llama-quantize --imatrix). With --eval,
    base and quantized model are compared on the same tokens with llama-perplexity --kl-divergence's figures:
    perplexity change, mean KL with its standard error, percentiles, top-1 agreement. --device and --dtype apply
    to --eval.
    """
    from gentool import console
    from gentool.devices import resolve_device, resolve_dtype
    from gentool.quantize import quantize_checkpoint

    dev = resolve_device(device)
    result = quantize_checkpoint(
        checkpoint, output, scheme=scheme, group_size=group_size, method=method, skip=_csv(skip),
        keep_16bit=_csv(keep_16bit), tensor_types=tensor_type or (), calibrate=calibrate,
        calibrate_split=calibrate_split, calibrate_tokens=calibrate_tokens, imatrix=imatrix, target_kl=target_kl,
        dequantize=dequantize, eval_data=eval_, force=force, verify=not no_verify, pure=pure,
        output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
        eval_options={"split": split, "window": window, "max_tokens": max_tokens, "batch_size": batch_size,
                      "device": dev, "dtype": resolve_dtype(dtype, dev), "kl_tokens": kl_tokens,
                      "protocol": protocol})
    console.emit(result, as_json=json_, title="quantize")


quantize.epilog = examples("gentool quantize runs/lm --scheme q4_k_m -o runs/lm-q4km --eval tokens",
                           "gentool quantize runs/lm --scheme q4_k_m --calibrate tokens -o runs/lm-q4km-im",
                           "gentool quantize runs/lm --scheme int4 --method optimized -o runs/lm-q4",
                           "gentool quantize runs/lm --target-kl 0.01 --calibrate tokens -o runs/lm-kl",
                           "gentool export-gguf runs/lm-q4km -o lm-q4_k_m.gguf")
