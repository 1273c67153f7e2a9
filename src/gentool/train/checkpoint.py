"""Training state for exact resume, in safetensors + JSON (never pickle): model, optimizer moments, step, RNGs."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, scalars


def save_state(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               extra: dict[str, Any], keep: int = 2, ema: torch.nn.Module | None = None) -> Path:
    """Write state/step-N atomically (temp dir then rename) and keep the last `keep`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        seen: dict[int, str] = {}
        for k in list(weights):  # safetensors refuses shared storage (tied embeddings): store once
            ptr = weights[k].data_ptr()
            if ptr in seen and weights[k].numel():
                del weights[k]
            else:
                seen[ptr] = k
        save_file(weights, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))
        tensors, scalars = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        # batches come from (seed, step) generators, so torch's RNG (dropout) is the only global state to keep
        meta = {"step": step, "optimizer_scalars": scalars, **extra}
        (tmp / "state.json").write_text(json.dumps(meta) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(directory: Path) -> Path | None:
    states = sorted(directory.glob("step-*")) if directory.is_dir() else []
    return states[-1] if states else None


def load_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               ema: torch.nn.Module | None = None) -> dict[str, Any]:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    model.load_state_dict(weights, strict=False)
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    tensors = load_file(str(path / "optimizer.safetensors"))
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    sd["state"] = state
    optimizer.load_state_dict(sd)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return meta
