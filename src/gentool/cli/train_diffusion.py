"""`gentool train-diffusion`: DDPM or flow-matching denoisers on images or vectors; masked-diffusion LMs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import (Compile, Device, Dtype, Force, Json, LogTo, Output, Resume, SaveMinutes, Seed,
                                  examples)
from gentool.cli._recipe import Config

Int = Optional[int]
MODEL, MASKED, REFLOW = "Denoiser and objective", "Masked/block-diffusion LM (token shards)", "Reflow"


def train_diffusion(
    data: Annotated[str, typer.Argument(help="Image folder (sub-folders = classes), .npy/.npz/.safetensors array "
                                             "(optional labels), builtin:moons|8gaussians|checkerboard|"
                                             "swissroll|digits, or a token-shards artifact (masked LM).")],
    output: Output,
    kind: Annotated[str, typer.Option(help="auto, denoiser (images/vectors), masked-lm (MDLM) or block-lm (BD3-LM) "
                                           "on token shards; auto picks an LM for a token-shards DATA.")] = "auto",
    family: Annotated[str, typer.Option(help="ddpm or flow-matching.")] = "ddpm",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 2000,
    batch_size: Annotated[Int, typer.Option(min=1, help="Examples per step (default 256; 64 sequences for LMs).")
                          ] = None,
    lr: Annotated[Optional[float], typer.Option(min=0, help="Peak learning rate, finite and above 0 (default 2e-3 MLP, "
                                                            "3e-4 U-Net, 1e-3 LMs).")] = None,
    parameterization: Annotated[Optional[str], typer.Option(help="ddpm: eps, v or x0 (default eps).",
                                                            rich_help_panel=MODEL)] = None,
    schedule: Annotated[str, typer.Option(help="ddpm noise schedule: linear or cosine.",
                                          rich_help_panel=MODEL)] = "linear",
    timesteps: Annotated[int, typer.Option(min=1, help="ddpm diffusion steps T.", rich_help_panel=MODEL)] = 1000,
    model: Annotated[Optional[str], typer.Option(help="mlp or unet (default: unet for images).",
                                                 rich_help_panel=MODEL)] = None,
    width: Annotated[Int, typer.Option(min=1, help="MLP width / U-Net base channels.", rich_help_panel=MODEL)] = None,
    depth: Annotated[Int, typer.Option(min=1,
                                       help="MLP blocks / U-Net res blocks per level.", rich_help_panel=MODEL)] = None,
    image_size: Annotated[Int, typer.Option(min=1, help="Resize and centre-crop folder images to this side.",
                                                   rich_help_panel=MODEL)] = None,
    unconditional: Annotated[bool, typer.Option(help="Ignore labels even when the data has them.",
                                                rich_help_panel=MODEL)] = False,
    class_dropout: Annotated[float, typer.Option(min=0, max=1, help="Label dropout for classifier-free guidance.",
                                                               rich_help_panel=MODEL)] = 0.1,
    ema_decay: Annotated[Optional[float], typer.Option(min=0, max=1,
                                                       help="EMA decay (default: 1 - 10/steps in [0.9, 0.999]).",
                                                       rich_help_panel=MODEL)] = None,
    preset: Annotated[str, typer.Option(help="Transformer shape (as train-lm).", rich_help_panel=MASKED)] = "small",
    seq_len: Annotated[int, typer.Option(min=1, help="Sequence length.", rich_help_panel=MASKED)] = 128,
    mask_schedule: Annotated[str, typer.Option(help="loglinear (alpha=1-t) or cosine (masked-lm).",
                                               rich_help_panel=MASKED)] = "loglinear",
    block_size: Annotated[Int, typer.Option(min=1, help="block-lm: tokens per block, a divisor of --seq-len (1 = AR, "
                                                        "seq-len = MDLM); implies --kind block-lm.",
                                                   rich_help_panel=MASKED)] = None,
    mask_range: Annotated[Optional[str], typer.Option(help="block-lm: training mask rates LO:HI (default: "
                                                           "BD3-LM's clipped range for the block size).",
                                                      rich_help_panel=MASKED)] = None,
    reflow_from: Annotated[Optional[Path], typer.Option(help="Train on (noise, sample) pairs of this flow-matching "
                                                             "checkpoint, starting from it.",
                                                        rich_help_panel=REFLOW)] = None,
    reflow_pairs: Annotated[Int, typer.Option(min=1, help="Pairs to generate (default: training-set size).",
                                                     rich_help_panel=REFLOW)] = None,
    save_every: Annotated[int, typer.Option(min=0, help="Save resumable state every N steps (0: at the end).")] = 0,
    save_minutes: SaveMinutes = 10.0,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = None,
    compile_: Compile = False,
    resume: Resume = False,
    log_to: LogTo = None,
    force: Force = False,
    config: Config = None,
    json_: Json = False,
) -> None:
    """Train a diffusion or flow-matching model; resumable, EMA weights.

    Works in OUTPUT.partial/ and renames it into a diffusion-checkpoint at the end (config.json,
    model.safetensors, ema.safetensors, metrics.jsonl). Labelled data trains a class-conditional model with
    label dropout, so `gentool sample --class C --guidance W` can use classifier-free guidance. Vectors are
    standardised (statistics kept in the checkpoint); images are scaled to [-1, 1]. Ctrl-C saves state and
    exits 130; --resume continues. A token-shards DATA trains a masked-diffusion LM (MDLM), or with
    --block-size a block-diffusion LM (BD3-LM: autoregressive over blocks, diffusion inside each).
    """
    from gentool import console
    from gentool.artifacts import probe
    from gentool.devices import resolve_device
    from gentool.errors import UsageProblem

    if kind not in ("auto", "denoiser", "masked-lm", "block-lm"):
        raise UsageProblem(f"unknown --kind {kind!r}", hint="use auto, denoiser, masked-lm or block-lm")
    if kind == "auto" and probe(data).kind == "token-shards":
        kind = "block-lm" if block_size is not None else "masked-lm"
    if kind in ("masked-lm", "block-lm"):
        from gentool.lm.train import LMRunOptions

        opts = LMRunOptions(
            tokens_dir=Path(data), out=output, preset=preset, seq_len=seq_len,
            micro_batch=64 if batch_size is None else batch_size, steps=steps, lr=1e-3 if lr is None else lr,
            save_every=save_every, save_minutes=save_minutes, seed=seed,
            device=resolve_device(device), dtype=dtype,
            compile=compile_, resume=resume, force=force, log_to=tuple(log_to or ()))
        if kind == "block-lm":
            from gentool.lm.diffusion.block import parse_mask_range, train_block_lm

            if block_size is None:
                raise UsageProblem("--kind block-lm needs --block-size", hint="e.g. --block-size 4")
            if mask_schedule != "loglinear":
                raise UsageProblem("block-lm uses the loglinear mask schedule", hint="drop --mask-schedule")
            summary = train_block_lm(opts, block_size, parse_mask_range(mask_range))
        else:
            from gentool.lm.diffusion.masked import train_masked_lm

            if block_size is not None or mask_range is not None:
                raise UsageProblem("--block-size and --mask-range are for --kind block-lm")
            summary = train_masked_lm(opts, mask_schedule)
    else:
        from gentool.diffusion.train import TrainDiffusionOptions, run_train_diffusion

        if block_size is not None or mask_range is not None:
            raise UsageProblem("--block-size and --mask-range are for block-diffusion LMs on token shards")
        if family not in ("ddpm", "flow-matching"):
            raise UsageProblem(f"unknown --family {family!r}", hint="use ddpm or flow-matching")
        if schedule not in ("linear", "cosine"):
            raise UsageProblem(f"unknown --schedule {schedule!r}", hint="use linear or cosine")
        if not 0 <= class_dropout < 1:
            raise UsageProblem("--class-dropout must be in [0, 1)")
        summary = run_train_diffusion(TrainDiffusionOptions(
            data=data, out=output, family=family, parameterization=parameterization, schedule=schedule,
            timesteps=timesteps, model=model, width=width, depth=depth, conditional=not unconditional,
            class_dropout=class_dropout, image_size=image_size, steps=steps,
            batch_size=256 if batch_size is None else batch_size, lr=lr,
            ema_decay=ema_decay, reflow_from=reflow_from, reflow_pairs=reflow_pairs, save_every=save_every,
            save_minutes=save_minutes,
            seed=seed, device=resolve_device(device), dtype=dtype, compile=compile_, resume=resume, force=force,
            log_to=tuple(log_to or ())))
    console.log(f"wrote {output}")
    console.emit(summary, as_json=json_)


train_diffusion.epilog = examples(
    "gentool train-diffusion builtin:moons -o runs/moons --steps 2000",
    "gentool train-diffusion builtin:digits -o runs/digits --steps 3000 --schedule cosine",
    "gentool train-diffusion builtin:moons -o runs/fm --family flow-matching",
    "gentool train-diffusion tokens -o runs/mdlm --kind masked-lm --steps 300",
    "gentool train-diffusion tokens -o runs/bd3 --kind block-lm --block-size 4 --steps 300",
)
