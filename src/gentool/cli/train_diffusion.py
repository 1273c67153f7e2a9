"""`gentool train-diffusion`: DDPM or flow-matching denoisers on images or vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import Device, Dtype, Force, Json, Output, Seed, examples

Int = Optional[int]


def train_diffusion(
    data: Annotated[str, typer.Argument(help="Image folder (sub-folders = classes), .npy/.npz/.safetensors array "
                                             "(optional labels), or builtin:moons|8gaussians|checkerboard|"
                                             "swissroll|digits.")],
    output: Output,
    kind: Annotated[str, typer.Option(help="auto, denoiser (images/vectors) or masked-lm (a masked-diffusion LM "
                                           "on token shards; auto picks it for a token-shards DATA).")] = "auto",
    preset: Annotated[str, typer.Option(help="masked-lm: transformer shape (as train-lm).")] = "small",
    seq_len: Annotated[int, typer.Option(help="masked-lm: sequence length.")] = 128,
    mask_schedule: Annotated[str, typer.Option(help="masked-lm: loglinear (alpha=1-t) or cosine.")] = "loglinear",
    family: Annotated[str, typer.Option(help="ddpm or flow-matching.")] = "ddpm",
    parameterization: Annotated[str | None, typer.Option(help="ddpm: eps, v or x0 (default eps).")] = None,
    schedule: Annotated[str, typer.Option(help="ddpm noise schedule: linear or cosine.")] = "linear",
    timesteps: Annotated[int, typer.Option(help="ddpm diffusion steps T.")] = 1000,
    model: Annotated[str | None, typer.Option(help="mlp or unet (default: unet for images).")] = None,
    width: Annotated[Int, typer.Option(help="MLP width / U-Net base channels.")] = None,
    depth: Annotated[Int, typer.Option(help="MLP blocks / U-Net res blocks per level.")] = None,
    image_size: Annotated[Int, typer.Option(help="Resize and centre-crop folder images to this side.")] = None,
    unconditional: Annotated[bool, typer.Option(help="Ignore labels even when the data has them.")] = False,
    class_dropout: Annotated[float, typer.Option(help="Label dropout for classifier-free guidance.")] = 0.1,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 256,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-3 MLP, 3e-4 U-Net).")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay (default: 1 - 10/steps in "
                                                            "[0.9, 0.999]).")] = None,
    reflow_from: Annotated[Path | None, typer.Option(help="Reflow: train on (noise, sample) pairs of this "
                                                             "flow-matching checkpoint, starting from it.")] = None,
    reflow_pairs: Annotated[Int, typer.Option(help="Reflow pairs to generate (default: training-set size).")] = None,
    save_every: Annotated[int, typer.Option(help="Save resumable state every N steps (0: at the end).")] = 0,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the denoiser.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run in OUTPUT.partial/.")] = False,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Train a diffusion or flow-matching model; resumable, EMA weights.

    Works in OUTPUT.partial/ and renames it into a diffusion-checkpoint at the end (config.json,
    model.safetensors, ema.safetensors, metrics.jsonl). Labelled data trains a class-conditional model with
    label dropout, so `gentool sample --class C --guidance W` can use classifier-free guidance. Vectors are
    standardised (statistics kept in the checkpoint); images are scaled to [-1, 1]. Ctrl-C saves state and
    exits 130; --resume continues.
    """
    from gentool import console
    from gentool.cli._options import resolve_device
    from gentool.diffusion.train import TrainDiffusionOptions, run_train_diffusion
    from gentool.errors import UsageProblem

    if kind == "masked-lm" or (kind == "auto" and (Path(data) / "manifest.json").is_file() and
                               '"gentool.token-shards"' in (Path(data) / "manifest.json").read_text()):
        from gentool.lm.train import LMRunOptions, run_train_lm

        summary = run_train_lm(LMRunOptions(
            tokens_dir=Path(data), out=output, preset=preset, seq_len=seq_len, micro_batch=min(batch_size, 64),
            steps=steps, lr=lr or 1e-3, save_every=save_every, seed=seed, device=resolve_device(device), dtype=dtype,
            compile=compile_, resume=resume, force=force, objective="masked", mask_schedule=mask_schedule))
        console.log(f"wrote {output}")
        console.emit(summary, as_json=json_)
        return
    if kind not in ("auto", "denoiser"):
        raise UsageProblem(f"unknown --kind {kind!r}", hint="use auto, denoiser or masked-lm")
    if family not in ("ddpm", "flow-matching"):
        raise UsageProblem(f"unknown --family {family!r}", hint="use ddpm or flow-matching")
    if schedule not in ("linear", "cosine"):
        raise UsageProblem(f"unknown --schedule {schedule!r}", hint="use linear or cosine")
    if not 0 <= class_dropout < 1:
        raise UsageProblem("--class-dropout must be in [0, 1)")
    opts = TrainDiffusionOptions(data=data, out=output, family=family, parameterization=parameterization,
                                 schedule=schedule, timesteps=timesteps, model=model, width=width, depth=depth,
                                 conditional=not unconditional, class_dropout=class_dropout, image_size=image_size,
                                 steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                                 reflow_from=reflow_from, reflow_pairs=reflow_pairs, save_every=save_every,
                                 seed=seed, device=resolve_device(device), dtype=dtype, compile=compile_,
                                 resume=resume, force=force)
    summary = run_train_diffusion(opts)
    console.log(f"wrote {output}")
    console.emit(summary, as_json=json_)


train_diffusion.epilog = examples(
    "gentool train-diffusion builtin:moons -o runs/moons --steps 2000",
    "gentool train-diffusion builtin:digits -o runs/digits --steps 3000 --schedule cosine",
    "gentool train-diffusion builtin:moons -o runs/fm --family flow-matching",
    "gentool train-diffusion tokens -o runs/mdlm --kind masked-lm --steps 300",
)
