"""Tiny Llama checkpoints (Hugging Face layout, no manifest) and the ways their weights or config.json break.
Loaded by path (importlib) from the tests of every reader: gguf, adapters, lm, cli."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gentool.config import config_from_preset
from gentool.models.checkpoint import save_lm
from gentool.models.transformer import Transformer

UP = "model.layers.0.mlp.up_proj.weight"


def checkpoint(path: Path, tokenizer: Path, *, seed: int = 0) -> Path:
    """A tiny float32 checkpoint (vocab 400, width 32, 2 layers) with `tokenizer`'s tokenizer.model."""
    torch.manual_seed(seed)
    cfg = config_from_preset("tiny", vocab_size=400)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    path.mkdir(parents=True)
    save_lm(model, cfg, path)
    shutil.copy(Path(tokenizer) / "tokenizer.model", path / "tokenizer.model")
    return path


def _edit(path: Path, fn) -> None:
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def _config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _activations(t: dict) -> None:
    """Every weight fits float16, but the logits (norm weight 6e4 times a head scaled 100x) do not."""
    t["model.norm.weight"].fill_(6e4)
    t["lm_head.weight"].mul_(100)


def _duplicate_key(path: Path) -> None:
    """Name one tensor twice in the header (safetensors' own reader keeps the second entry silently)."""
    import struct

    f = path / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode().rstrip()
    first = json.loads(header)
    name = next(k for k in first if k != "__metadata__")
    new = (header[:-1] + f', "{name}": {json.dumps(first[name])}' + "}").encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


DAMAGE = {
    "truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]),
    "dupkey": _duplicate_key,
    "nan": lambda d: _edit(d, lambda t: t[UP].__setitem__((0, 0), float("nan"))),
    "inf": lambda d: _edit(d, lambda t: t[UP].__setitem__((0, 0), float("-inf"))),
    "fp16big": lambda d: _edit(d, lambda t: t[UP].__setitem__((1, 2), 1e6)),  # finite; float16 stops at 65504
    "missing": lambda d: _edit(d, lambda t: t.pop("model.norm.weight")),
    "extra": lambda d: _edit(d, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(3))),
    "heads0": lambda d: _config(d, num_attention_heads=0),
    "activations": lambda d: _edit(d, _activations),
}


def broken(good: Path, where: Path, kind: str) -> Path:
    """A copy of `good` damaged by DAMAGE[kind]."""
    shutil.copytree(good, where)
    DAMAGE[kind](where)
    return where
