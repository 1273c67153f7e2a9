"""`gentool lora-merge`: fold LoRA adapters (or fine-tunes of one base) into the base, by a merging method."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import ADVANCED, Device, Force, Json, NoVerify, Output, examples

METHOD = "Merging method"
EVAL = "Damage report"


def lora_merge(
    base: Annotated[Path, typer.Argument(help="Base lm-checkpoint, quantized-checkpoint (QLoRA) or Hugging Face "
                                              "Llama directory.")],
    adapters: Annotated[list[str], typer.Argument(
        help="Adapter directories (gentool lora-adapter or PEFT) or fine-tuned checkpoints of the base, each "
             "optionally with a weight: DIR:0.5.")],
    output: Output,
    method: Annotated[str, typer.Option(help="task_arithmetic (W + Σ w·ΔW, exact), or PEFT add_weighted_adapter's "
                                             "combination types: linear, cat, svd, ties, ties_svd, dare_linear, "
                                             "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, "
                                             "magnitude_prune_svd.", rich_help_panel=METHOD)] = "task_arithmetic",
    density: Annotated[Optional[float], typer.Option(min=0, max=1,
                                                     help="Fraction of values kept, in (0, 1] (ties, dare_*, "
                                                          "magnitude_prune).", rich_help_panel=METHOD)] = None,
    majority_sign: Annotated[str, typer.Option(help="TIES sign election: total (of the values) or frequency (of "
                                                    "the signs).", rich_help_panel=METHOD)] = "total",
    seed: Annotated[int, typer.Option(min=0, help="Seed of DARE's random drops (PEFT's under torch.manual_seed).",
                                             rich_help_panel=METHOD)] = 0,
    rank: Annotated[Optional[int], typer.Option(min=1,
                                                help="Rank of the SVD methods' result (default: the largest input "
                                                     "rank when writing an adapter, no truncation when merging).",
                                                rich_help_panel=METHOD)] = None,
    svd_clamp: Annotated[Optional[float], typer.Option(min=0, max=1,
                                                       help="Clamp the SVD factors at this quantile of their "
                                                            "entries (PEFT's svd_clamp).",
                                                       rich_help_panel=ADVANCED)] = None,
    as_adapter: Annotated[bool, typer.Option("--as-adapter", help="Write the combination as one adapter (PEFT "
                                                                  "layout) instead of a merged checkpoint.",
                                             rich_help_panel=METHOD)] = False,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="float32, bfloat16 or float16 for the output (default: each tensor keeps the base's "
                        "dtype; 16-bit for a quantized base).")] = None,
    requantize: Annotated[bool, typer.Option("--requantize", help="Quantized base: quantize the merge again with "
                                                                  "the base's scheme (default: write 16-bit).")
                          ] = False,
    eval_: Annotated[Optional[list[str]], typer.Option("--eval", help="Measure the damage of the merge against "
                                                       "the unmerged adapter on this data: token shards or text "
                                                       "files (repeatable).", rich_help_panel=EVAL)] = None,
    split: Annotated[str, typer.Option(help="Split of token shards for --eval.", rich_help_panel=EVAL)] = "val",
    window: Annotated[Optional[int], typer.Option(min=2, help="--eval context window (default: the model's).",
                                                         rich_help_panel=EVAL)] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="--eval at most this many tokens.",
                                                             rich_help_panel=EVAL)] = None,
    ignore_base_mismatch: Annotated[bool, typer.Option(
        "--ignore-base-mismatch", help="Merge even when the base's sha256 differs from the adapter's base "
                                       "(shapes must still fit).", rich_help_panel=ADVANCED)] = False,
    device: Device = "cpu",
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Merge LoRA adapters into a base, or combine them into one adapter.

    Reads gentool's lora-adapter artifacts and PEFT adapters (LoRA, rsLoRA, rank/alpha patterns,
    modules_to_save, DoRA), and fine-tuned checkpoints of the base as task vectors. The default task_arithmetic
    writes W' = W + Σ w·ΔW (computed in float32); the other methods follow PEFT's add_weighted_adapter with the
    same weights, --density, --majority-sign and --seed: linear, ties, dare_linear, dare_ties and magnitude_prune
    combine the A and B factors (equal ranks needed), cat stacks them, and the *_svd methods (and svd) combine
    the dense changes and factor them to --rank. On a quantized base (QLoRA) the merge goes into the dequantized
    weights and is written 16-bit; --requantize quantizes it again, and --eval then reports KL, top-1 agreement
    and ΔPPL against the unmerged adapter. Every refusal (bases, shapes, ranks, DoRA where a method cannot take
    it, --density outside (0, 1]) comes before any work.
    """
    from gentool import console
    from gentool.adapters import merge_checkpoint
    from gentool.devices import resolve_device, resolve_dtype

    torch_dtype = resolve_dtype(dtype, "cpu") if dtype is not None else None
    dev = resolve_device(device)
    result = merge_checkpoint(
        base, adapters, output, method=method, density=density, majority_sign=majority_sign, seed=seed, rank=rank,
        svd_clamp=svd_clamp, as_adapter=as_adapter, dtype=torch_dtype, requantize=requantize, eval_data=eval_,
        eval_options={"split": split, "window": window, "max_tokens": max_tokens, "device": dev,
                      "dtype": resolve_dtype(None, dev)},
        force=force, ignore_base_mismatch=ignore_base_mismatch, verify=not no_verify)
    console.log(f"wrote {output}")
    console.emit(result, as_json=json_, title="lora-merge")


lora_merge.epilog = examples(
    "gentool lora-merge runs/base runs/adapter -o runs/merged",
    "gentool lora-merge runs/base style:0.7 topic:0.3 -o runs/mix --dtype bfloat16",
    "gentool lora-merge runs/base tragic:1 comic:1 --method ties --density 0.5 -o runs/ties",
    "gentool lora-merge runs/base a b --method dare_linear_svd --density 0.7 --seed 1 --as-adapter -o runs/ab",
    "gentool lora-merge runs/base-nf4 runs/qlora -o runs/merged-bf16",
    "gentool lora-merge runs/base-nf4 runs/qlora --requantize --eval tokens -o runs/merged-nf4",
    "gentool lora-merge hf-llama/ peft-adapter/ -o merged --json",
)
