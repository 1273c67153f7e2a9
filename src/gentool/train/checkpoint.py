"""Training state for exact resume, in safetensors + JSON (never pickle).

state/step-NNNNNNNN/
    model.safetensors      weights (tied tensors stored once)
    ema.safetensors        the EMA copy, when there is one
    optimizer.safetensors  optimizer state (AdamW moments and step counts, Muon momenta), keyed "<param index>.<name>"
    rng.safetensors        torch CPU / CUDA generator states (uint8 tensors)
    state.json             step, optimizer scalars, numpy and python RNG states, the task's data cursor, the recipe

Each directory is written under a temporary name and renamed into place; the last `keep` are kept. A failed write
(a full disk) leaves the states saved before it as they were, and says so.

Under FSDP2 the state is consolidated: the DTensor shards are gathered one tensor at a time (save_state is called
on all ranks; only rank 0 keeps the CPU copies and writes), and on load every rank reads one tensor at a time and
keeps its own shard. The files are the same as a single process writes, whatever the number of processes; the
price is that rank 0 holds the whole state in CPU memory while saving (12 bytes per parameter with AdamW).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gentool.artifacts.store import replace_dir, sweep_stale, temp_sibling, write_failure


def _whole(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """A CPU copy of t; a DTensor shard is gathered first (a collective: every rank calls it, in the same order),
    and a rank that does not write drops it at once (`keep=False`), so only the writer holds the whole state."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu().contiguous() if keep else None


def _as_local(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` as `like` holds it: this rank's shard of a DTensor (no communication), else unchanged."""
    if not hasattr(like, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _tensors(path: Path):
    """(name, tensor) of a safetensors file, one tensor in memory at a time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def _unique_weights(module: torch.nn.Module, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU copies of the state dict with tied tensors once (safetensors refuses shared storage), and the aliases."""
    weights, aliases, seen = {}, {}, {}
    for k, v in module.state_dict().items():
        local = v.to_local() if hasattr(v, "to_local") else v
        key = (local.data_ptr(), v.dtype, tuple(v.shape))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        weights[k] = _whole(v, keep)
    return weights, aliases


def _load_weights(module: torch.nn.Module, path: Path, aliases: dict[str, str]) -> None:
    target = module.state_dict()
    weights = {k: _as_local(v, target[k]) if k in target else v for k, v in _tensors(path)}
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
               extra: dict[str, Any], keep: int = 2, ema: torch.nn.Module | None = None,
               write: bool = True) -> Path:
    """Write directory/step-N atomically (temp dir, then rename) and keep the last `keep`. Under FSDP2 every rank
    calls this (the shards are gathered) and only the one with `write` writes."""
    from safetensors.torch import save_file

    final = directory / f"step-{step:08d}"
    weights, aliases = _unique_weights(model, write)
    ema_weights = _unique_weights(ema, write)[0] if ema is not None else None
    tensors, scalars = {}, {}
    for idx, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = _whole(v, write)
            else:
                scalars[f"{idx}.{k}"] = v
    if not write:
        return final
    tmp = temp_sibling(final)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sweep_stale(directory, every=True)  # what a killed run was writing
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        if ema_weights is not None:
            save_file(ema_weights, str(tmp / "ema.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = {"step": step, "aliases": aliases, "optimizer_scalars": scalars, "rng": _rng_json(), **extra}
        (tmp / "state.json").write_text(json.dumps(meta) + "\n")
        replace_dir(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if failed := write_failure(e, final, hint=resume_hint(directory)):
            raise failed from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(directory.glob("step-*"))[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_hint(directory: Path) -> str:
    """After a failed write (a full disk): what the state directory keeps to resume from, and how."""
    last = latest_state(directory)
    if last is None:
        return "no state had been saved yet; free some space and run again with --force (it starts over)"
    return f"the last saved state ({last}) is intact; free some space, then continue with --resume"


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
    params = [p for g in optimizer.param_groups for p in g["params"]]   # state_dict's indices, in order
    state: dict[int, dict[str, Any]] = {}
    for key, value in _tensors(path / "optimizer.safetensors"):
        idx, name = key.split(".", 1)
        p = params[int(idx)]
        state.setdefault(int(idx), {})[name] = _as_local(value, p) if value.shape == p.shape else value
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
