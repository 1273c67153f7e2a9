"""`gentool lora-extract` (a LoRA adapter from two checkpoints) and `gentool lora-resize` (an adapter's rank)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gentool.cli._options import Device, Force, Json, NoVerify, Output, examples

EVAL = "KL report"
Rank = Annotated[int, typer.Option("--rank", "-r", min=1, help="Rank of every module (the cap with --energy).")]
Energy = Annotated[Optional[float], typer.Option(min=0, max=1,
                                                 help="Per module, keep the fewest singular values holding this "
                                                      "fraction of Σ s² (0 < E ≤ 1), at most --rank.")]
Eval = Annotated[Optional[list[str]], typer.Option("--eval", help="Data for the KL report: token shards or text "
                                                   "files (repeatable).", rich_help_panel=EVAL)]
Split = Annotated[str, typer.Option(help="Split of token shards for --eval.", rich_help_panel=EVAL)]
Window = Annotated[Optional[int], typer.Option(min=2, help="--eval context window (default: the model's).",
                                                      rich_help_panel=EVAL)]
MaxTokens = Annotated[Optional[int], typer.Option(min=1, help="--eval at most this many tokens.", rich_help_panel=EVAL)]


def _emit(result: dict[str, Any], as_json: bool, title: str) -> None:
    from gentool import console

    if as_json:
        console.emit(result, as_json=True)
        return
    rows = result.pop("per_module")
    console.emit(result, as_json=False, title=title)
    width = max(len(r["module"]) for r in rows)
    print(f"\n{'module':<{width}}  rank  rel_error  energy")
    for r in rows:
        print(f"{r['module']:<{width}}  {r['rank']:>4}  {r['rel_error']:>9.4g}  {r['energy']:.4f}")


def _options(split, window, max_tokens, device) -> dict:
    from gentool.devices import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return {"split": split, "window": window, "max_tokens": max_tokens, "device": dev,
            "dtype": resolve_dtype(None, dev)}


def lora_extract(
    base: Annotated[Path, typer.Argument(help="Base lm-checkpoint (or Hugging Face Llama directory).")],
    tuned: Annotated[Path, typer.Argument(help="The fully fine-tuned checkpoint of that base.")],
    output: Output,
    rank: Rank = 16,
    energy: Energy = None,
    targets: Annotated[str, typer.Option(help="Comma-separated module names, or all-linear (every linear layer "
                                              "but the output head).")] = "all-linear",
    eval_: Eval = None,
    split: Split = "val",
    window: Window = None,
    max_tokens: MaxTokens = None,
    device: Device = "cpu",
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Extract a LoRA adapter from a base and its fine-tune (truncated SVD).

    Each targeted weight's change is replaced by its truncated SVD. Writes a lora-adapter (PEFT layout) with
    B = U√S, A = √S Vᵀ of the top singular values and scaling 1; per-module ranks (--energy) go into PEFT's
    rank_pattern. The report lists each module's relative reconstruction error ‖ΔW − BA‖/‖ΔW‖ and kept energy;
    with --eval, KL(TUNED ‖ BASE + adapter), top-1 agreement and ΔPPL on the data, beside the base's own KL
    against TUNED. Changed tensors that are not linear targets (norms, embeddings) are named: an adapter cannot
    hold them.
    """
    from gentool.adapters.extract import extract_adapter

    result = extract_adapter(base, tuned, output, rank=rank, energy=energy, targets=targets, eval_data=eval_,
                             eval_options=_options(split, window, max_tokens, device), force=force,
                             verify=not no_verify)
    _emit(result, json_, "lora-extract")


lora_extract.epilog = examples(
    "gentool lora-extract runs/base runs/full-ft -o runs/extracted --rank 16",
    "gentool lora-extract runs/base runs/full-ft -o runs/ex --rank 64 --energy 0.9 --eval tokens",
    "gentool lora-extract hf-base/ hf-instruct/ -o ex --targets q_proj,v_proj --json",
)


def lora_resize(
    adapter: Annotated[Path, typer.Argument(help="A lora-adapter or PEFT adapter directory (not DoRA).")],
    output: Output,
    rank: Rank = 8,
    energy: Energy = None,
    base: Annotated[Optional[Path], typer.Option(help="The adapter's base, for --eval (and to check the adapter "
                                                      "against).", rich_help_panel=EVAL)] = None,
    eval_: Eval = None,
    split: Split = "val",
    window: Window = None,
    max_tokens: MaxTokens = None,
    device: Device = "cpu",
    force: Force = False,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Change an adapter's rank by truncated SVD of each module's change.

    The result is the best approximation of each module's change at the new rank (computed from the factors,
    never forming the dense matrix), written with scaling 1; modules_to_save are copied. --rank cannot exceed a
    module's own rank. With --base and --eval, KL(base + adapter ‖ base + resized) on the data.
    """
    from gentool.adapters.extract import resize_adapter

    result = resize_adapter(adapter, output, rank=rank, energy=energy, base_path=base, eval_data=eval_,
                            eval_options=_options(split, window, max_tokens, device), force=force,
                            verify=not no_verify)
    _emit(result, json_, "lora-resize")


lora_resize.epilog = examples(
    "gentool lora-resize runs/adapter-r64 -o runs/adapter-r16 --rank 16",
    "gentool lora-resize runs/adapter -o runs/small --rank 32 --energy 0.95 --base runs/base --eval tokens",
)
