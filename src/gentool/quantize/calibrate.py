"""Calibration: run the float model over token shards or text and accumulate, for every linear layer's input
column, the sum of squared activations and the token count — llama.cpp's importance matrix — and, for GPTQ int4,
the input Gram matrix Σ x xᵀ. Read and write the importance matrix as llama.cpp's imatrix file (GGUF form, GGUF
tensor names; blk.* weights and an untied output head, as llama-imatrix --process-output), so it goes either way
between the two tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gentool import console
from gentool.codecs.gguf_names import gguf_name, hf_name
from gentool.errors import UsageProblem

DEFAULT_TOKENS = 8192


@dataclass
class Calibration:
    sums: dict[str, torch.Tensor]                 # HF weight name -> (in,) float64 Σ x² over calibration tokens
    counts: dict[str, int]                        # tokens seen by each
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # HF weight name -> (in, in) float64 Σ x xᵀ
    tokens: int = 0
    window: int = 0
    source: dict[str, Any] = field(default_factory=dict)          # data, split, id, tokens

    def values(self) -> dict[str, np.ndarray]:
        """HF weight name -> mean squared activation per input column: float32 sums over float32 counts, the
        numbers llama-quantize computes from the imatrix file, so both tools quantize with the same values."""
        return {k: s.float().numpy() / np.float32(max(self.counts[k], 1)) for k, s in self.sums.items()}


def calibration_ids(lm, data: list[str], *, split: str = "train", max_tokens: int = DEFAULT_TOKENS,
                    verify: bool = True) -> tuple[torch.Tensor, list[dict], dict[str, Any]]:
    """The calibration tokens: one split of token shards made with the checkpoint's tokenizer, or text files."""
    from gentool.artifacts import input_ref
    from gentool.data.tokenizer import load_tokenizer
    from gentool.evaluation.tokens import is_shards, load_eval_tokens

    tok = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else None
    if len(data) == 1 and is_shards(data[0]):
        from gentool.data.shards import open_shards

        shards = open_shards(data[0], split, verify=verify)
        if tok is None or shards.tokenizer_id != tok.sha256:
            raise UsageProblem("--calibrate: the shards were encoded with another tokenizer than the checkpoint's",
                               path=data[0], hint="calibrate on shards made with the checkpoint's tokenizer, or on "
                                                  "text files")
    ev = load_eval_tokens(data, tok, vocab_size=lm.config.vocab_size, split=split, max_tokens=max_tokens,
                          verify=verify, where=lm.path)
    refs = [input_ref("calibration", d) for d in data]
    ids = ev.ids[:max_tokens]
    source = {"data": [str(d) for d in data], "split": split if ev.from_shards else None,
              "id": [r.get("id") or r.get("sha256") for r in refs], "tokens": len(ids)}
    return ids, refs, source


@torch.no_grad()
def collect(model: nn.Module, ids: torch.Tensor, *, window: int, gram_for: set[str] = frozenset(),
            batch_size: int = 4, device: str = "cpu", source: dict | None = None) -> Calibration:
    """Forward the model over consecutive windows of `ids`, accumulating every nn.Linear's input statistics."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    gram: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
            if name in gram_for:
                gram[name] = gram.get(name, 0) + (x.T @ x).cpu()
        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(hook(f"{name}.weight")))
    starts = list(range(0, max(len(ids) - 1, 1), window))
    seen = 0
    try:
        with console.progress("calibrating", total=len(starts)) as bar:
            for i in range(0, len(starts), batch_size):
                chunk = [ids[s:s + window] for s in starts[i:i + batch_size]]
                for x in _same_length(chunk):
                    h = model.hidden_states(x.to(device))
                    for r in range(0, h.shape[1], 256):  # the output head in slices: no (B, T, V) logits at once
                        model.lm_head(h[:, r:r + 256])
                seen += sum(len(c) for c in chunk)
                bar.update(len(chunk))
    finally:
        for h in hooks:
            h.remove()
    return Calibration(sums, counts, gram, tokens=seen, window=window, source=source or {})


def _same_length(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    full = [c for c in chunks if len(c) == len(chunks[0])]
    rest = [c[None] for c in chunks if len(c) != len(chunks[0]) and len(c) > 0]
    return ([torch.stack(full)] if full else []) + rest


def imatrix_names(names, tied: bool) -> dict[str, str]:
    """HF weight name -> GGUF name of the weights llama-imatrix records (blk.*, and an untied output head)."""
    out = {}
    for k in names:
        g = gguf_name(k)
        if g is not None and (g.startswith("blk.") or (g == "output.weight" and not tied)):
            out[k] = g
    return out


def write_imatrix_file(cal: Calibration, path: Path, *, tied: bool) -> None:
    from gentool.codecs.imatrix import write_imatrix

    names = imatrix_names(cal.sums, tied)
    sums = {g: cal.sums[k].float().numpy() for k, g in names.items()}
    counts = {g: cal.counts[k] for k, g in names.items()}
    data = cal.source.get("data") or ["gentool"]
    write_imatrix(path, sums, counts, datasets=[str(d) for d in data],
                  chunk_count=max(1, -(-cal.tokens // max(cal.window, 1))), chunk_size=cal.window)


def read_imatrix_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """An imatrix file's mean squared activations under HF names; refused when made for another model (a name
    or a size that does not fit the checkpoint's weights)."""
    from gentool.codecs.imatrix import check_imatrix, load_imatrix

    values = load_imatrix(path)
    gshapes = {gguf_name(k): s for k, s in shapes.items() if gguf_name(k)}
    unknown = sorted(set(values) - set(gshapes))
    if unknown:
        raise UsageProblem(f"imatrix entry {unknown[0]} names no weight of this model", path=path,
                           hint="the importance matrix was computed for another model")
    check_imatrix(values, gshapes, path=path)
    return {hf_name(k): v for k, v in values.items()}
