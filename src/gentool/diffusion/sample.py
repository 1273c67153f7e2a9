"""Sampling a diffusion checkpoint: samples artifact (samples.safetensors, grid.png or scatter.png) and scores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.artifacts import check_output, create_artifact, input_ref
from gentool.data.arrays import load_data, to_uint8, train_val
from gentool.diffusion.checkpoint import LoadedDiffusion, load_diffusion
from gentool.diffusion.samplers import ALIASES, DDPM_SAMPLERS, FLOW_SAMPLERS, sample
from gentool.diffusion.metrics import score_samples
from gentool.errors import UsageProblem


def reference_data(ckpt: LoadedDiffusion, data: str | None, split: str = "val") -> tuple[torch.Tensor, Any]:
    """Held-out data in model space (standardised vectors, images in [-1, 1]): DATA, else the checkpoint's split."""
    if data is None or data == "auto":
        src = ckpt.data["source"]
        try:
            tr, val = train_val(src["spec"], image_size=src.get("image_size"), n=src.get("n", 8192),
                                seed=src.get("seed", 0), val_fraction=src.get("val_fraction", 0.1))
        except UsageProblem as e:
            raise UsageProblem(f"cannot find the training data '{src['spec']}' ({e.message})",
                               hint="pass the held-out data explicitly") from None
        ds = val if split == "val" else tr
    else:
        ds = load_data(data, image_size=ckpt.denoiser.data_shape[-1] if len(ckpt.denoiser.data_shape) == 3 else None)
    if ds.shape != ckpt.denoiser.data_shape:
        raise UsageProblem(f"the data has shape {ds.shape}, the model {ckpt.denoiser.data_shape}", path=data)
    x = ds.x if ds.kind == "image" else ckpt.normalize(ds.x)
    return x, ds


def resolve_sampler(ckpt: LoadedDiffusion, sampler: str | None, steps: int | None) -> tuple[str, int]:
    flow = ckpt.spec.family == "flow-matching"
    name = ALIASES.get(sampler, sampler) if sampler else ("heun" if flow else "ddim")
    allowed = FLOW_SAMPLERS if flow else DDPM_SAMPLERS
    if name not in allowed:
        raise UsageProblem(f"sampler {name!r} does not apply to a {ckpt.spec.family} model",
                           hint=f"use one of {', '.join(allowed)}")
    steps = steps or (ckpt.spec.timesteps if name == "ddpm" else 20 if flow else min(50, ckpt.spec.timesteps))
    if steps < 1 or (not flow and steps > ckpt.spec.timesteps):
        raise UsageProblem(f"--steps must be between 1 and {ckpt.spec.timesteps if not flow else 'any'}")
    return name, steps


def _labels(ckpt: LoadedDiffusion, class_: str | None, n: int) -> torch.Tensor | None:
    classes = ckpt.data.get("classes")
    if class_ is None:
        return torch.arange(n) % len(classes) if classes else None
    if not classes:
        raise UsageProblem("--class given, but the model was trained without classes")
    if class_ in classes:
        return torch.full((n,), classes.index(class_))
    raise UsageProblem(f"unknown class {class_!r}", hint=f"classes: {', '.join(classes)}")


def generate(ckpt: LoadedDiffusion, *, num_samples: int, sampler: str, steps: int, eta: float = 0.0,
             guidance: float = 1.0, y: torch.Tensor | None = None, seed: int = 0, batch_size: int = 1024,
             device: str = "cpu") -> tuple[torch.Tensor, int]:
    """Samples in model space; noise from a CPU generator so a seed gives the same samples on any device."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, *ckpt.denoiser.data_shape, generator=g)
    gdev = torch.Generator(device=device).manual_seed(seed + 1)
    out, nfe = [], 0
    clip = ckpt.data.get("kind") == "image"
    with console.progress("sampling", num_samples) as bar, torch.no_grad():
        for k in range(0, num_samples, batch_size):
            yk = None if y is None else y[k:k + batch_size].to(device)
            x, nfe = sample(ckpt.model, ckpt.spec, noise[k:k + batch_size].to(device), yk, sampler=sampler,
                            steps=steps, eta=eta, guidance=guidance, clip=clip, generator=gdev)
            out.append(x.cpu())
            bar.update(advance=len(x))
    return torch.cat(out), nfe


def sample_checkpoint(checkpoint: str | Path, out: str | Path | None = None, *, sampler: str | None = None,
                      steps: int | None = None, eta: float = 0.0, num_samples: int = 64, class_: str | None = None,
                      guidance: float = 1.0, seed: int = 0, device: str = "cpu", score: str | None = None,
                      batch_size: int = 1024, force: bool = False, verify: bool = True) -> dict[str, Any]:
    if out is not None:
        check_output(out, force=force, sources=[checkpoint, score if score != "auto" else None])
    if num_samples < 1 or (score is not None and num_samples < 2):
        raise UsageProblem("--num-samples must be at least 1 (2 with --score)")
    if not 0.0 <= eta <= 1.0:
        raise UsageProblem("--eta must be between 0 and 1")
    ckpt = load_diffusion(checkpoint, device=device, verify=verify)
    name, steps = resolve_sampler(ckpt, sampler, steps)
    y = _labels(ckpt, class_, num_samples)
    ref = reference_data(ckpt, score)[0] if score is not None else None
    t0 = time.time()
    x, nfe = generate(ckpt, num_samples=num_samples, sampler=name, steps=steps, eta=eta, guidance=guidance, y=y,
                      seed=seed, batch_size=batch_size, device=device)
    seconds = time.time() - t0
    image = ckpt.data.get("kind") == "image"
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "sampler": name, "steps": steps, "nfe": nfe,
                              "num_samples": num_samples, "seconds": round(seconds, 3)}
    if ref is not None:
        if image:  # 8-bit data: score the samples as they are stored
            result.update(score_samples(to_uint8(x).float() / 127.5 - 1 if ckpt.data.get("levels") else x, ref,
                                        seed=seed))
        else:  # in the data's own units
            result.update(score_samples(ckpt.denormalize(x), ckpt.denormalize(ref), seed=seed))
    if out is None:
        return result
    sampler_info = {"name": name, "steps": steps, "nfe": nfe, "eta": eta if name == "ddim" else None,
                    "guidance": guidance, "seed": seed, "class": class_}
    with create_artifact(out, "samples", force=force, config={"sampler": sampler_info, "num_samples": num_samples},
                         inputs=[input_ref("source", ckpt.manifest)]) as art:
        from safetensors.torch import save_file

        from gentool.diffusion.plots import save_grid, save_scatter

        tensors = {"samples": to_uint8(x) if image else ckpt.denormalize(x).float().contiguous()}
        if y is not None:
            tensors["labels"] = y.contiguous()
        save_file(tensors, str(art.dir / "samples.safetensors"), metadata={"gentool.format": "gentool.samples"})
        if image:
            save_grid(tensors["samples"][:256], art.dir / "grid.png")
        elif x.shape[1] >= 2:
            save_scatter(tensors["samples"], art.dir / "scatter.png",
                         reference=None if ref is None else ckpt.denormalize(ref))
        art.contents.update(source_id=ckpt.manifest.id, sampler=sampler_info, data_shape=ckpt.denoiser.data_shape,
                            data_kind=ckpt.data.get("kind"), classes=ckpt.data.get("classes"), count=num_samples)
        art.metrics.update({k: v for k, v in result.items() if k not in ("checkpoint", "sampler", "steps", "nfe",
                                                                         "num_samples")})
    result["output"] = str(out)
    return result
