"""Training state for exact resume, in safetensors + JSON (never pickle).

state/step-NNNNNNNN/
    model.safetensors      weights (tied tensors stored once)
    ema.safetensors        the EMA copy, when there is one
    optimizer.safetensors  AdamW moments and step counts, keyed "<param index>.<name>"
    rng.safetensors        torch CPU / CUDA generator states (uint8 tensors)
    state.json             step, optimizer scalars, numpy and python RNG states, the task's data cursor, the recipe

Each directory is written under a temporary name and renamed into place; the last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _unique_weights(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU copies of the state dict with tied tensors once (safetensors refuses shared storage), and the aliases."""
    weights, aliases, seen = {}, {}, {}
    for k, v in module.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        weights[k] = v.detach().cpu().contiguous()
    return weights, aliases


def _load_weights(module: torch.nn.Module, path: Path, aliases: dict[str, str]) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(path))
    for alias, source in aliases.items():
        weights[alias] = weights[source]
    module.load_state_dict(weights, strict=True)


def _rng_json() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_json(rng: dict[str, Any]) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_state(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               extra: dict[str, Any], keep: int = 2, ema: torch.nn.Module | None = None) -> Path:
    """Write directory/step-N atomically (temp dir, then rename) and keep the last `keep`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights, aliases = _unique_weights(model)
        save_file(weights, str(tmp / "model.safetensors"))
        if ema is not None:
            ema_weights, _ = _unique_weights(ema)
            save_file(ema_weights, str(tmp / "ema.safetensors"))
        sd = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = {"step": step, "aliases": aliases, "optimizer_scalars": scalars, "rng": _rng_json(), **extra}
        (tmp / "state.json").write_text(json.dumps(meta) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(directory.glob("step-*"))[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(directory: Path) -> Path | None:
    states = sorted(p for p in directory.glob("step-*") if (p / "state.json").is_file()) if directory.is_dir() \
        else []
    return states[-1] if states else None


def read_state_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               ema: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore weights, optimizer moments and every RNG; returns state.json (step, cursor, recipe...)."""
    from safetensors.torch import load_file

    meta = read_state_meta(path)
    aliases = meta.get("aliases", {})
    _load_weights(model, path / "model.safetensors", aliases)
    if ema is not None and (path / "ema.safetensors").is_file():
        _load_weights(ema, path / "ema.safetensors", aliases)
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(path / "optimizer.safetensors")).items():
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
    if "rng" in meta:
        _set_rng_json(meta["rng"])
    return meta
