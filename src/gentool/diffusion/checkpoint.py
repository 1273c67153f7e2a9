"""diffusion-checkpoint I/O: config.json (denoiser + diffusion + data facts), model.safetensors, ema.safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gentool.artifacts import Manifest, read_artifact
from gentool.errors import GentoolError
from gentool.diffusion.objectives import DiffusionSpec
from gentool.models.denoisers import DenoiserConfig, build_denoiser


@dataclass
class LoadedDiffusion:
    model: torch.nn.Module
    spec: DiffusionSpec
    denoiser: DenoiserConfig
    data: dict                 # kind, levels, classes, normalization, source (spec, image_size, n, seed, val_fraction)
    manifest: Manifest | None

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.data.get("normalization")
        if not norm:
            return x
        return x * torch.tensor(norm["std"], device=x.device) + torch.tensor(norm["mean"], device=x.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.data.get("normalization")
        if not norm:
            return x
        return (x - torch.tensor(norm["mean"], device=x.device)) / torch.tensor(norm["std"], device=x.device)


def save_diffusion(directory: Path, model: torch.nn.Module, ema: torch.nn.Module | None, spec: DiffusionSpec,
                   denoiser: DenoiserConfig, data: dict) -> None:
    from safetensors.torch import save_file

    meta = {"gentool.format": "gentool.diffusion-checkpoint"}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"), metadata=meta)
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  str(directory / "ema.safetensors"), metadata=meta)
    config = {"denoiser": denoiser.to_dict(), "diffusion": spec.to_dict(), "data": data}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_diffusion(path: str | Path, *, device: str = "cpu", ema: bool = True, verify: bool = True) -> LoadedDiffusion:
    """The denoiser (EMA weights when present and `ema`) in eval mode, with its spec and data facts."""
    from gentool.artifacts.tensorfiles import load_tensors

    manifest = read_artifact(path, "diffusion-checkpoint", verify=verify)
    try:
        config = json.loads(manifest.file("config.json").read_text(encoding="utf-8"))
        denoiser = DenoiserConfig.from_dict(config["denoiser"])
        spec = DiffusionSpec(**config["diffusion"])
        with torch.device("meta"):
            model = build_denoiser(denoiser)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GentoolError(f"config.json is malformed ({type(e).__name__}: {e})", path=manifest.file("config.json"),
                           hint="the checkpoint is corrupt; re-create it") from None
    weights = "ema.safetensors" if ema and manifest.file("ema.safetensors").is_file() else "model.safetensors"
    model.load_state_dict(load_tensors(manifest.file(weights), device=device), assign=True)
    return LoadedDiffusion(model.eval(), spec, denoiser, config["data"], manifest)
