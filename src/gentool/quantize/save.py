"""Writing a quantized-checkpoint of gentool's own schemes (int8, int4, NF4, FP8), and the helpers every scheme
shares (the base's dtype and size, the tokenizer copied along)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from gentool.artifacts import sha256_file
from gentool.devices import DTYPE_ALIASES, dtype_name, torch_dtype
from gentool.models.checkpoint import save_lm_config, weight_files
from gentool.models.quant import HEAD, quantized_modules

SCHEME_NAMES = {"int8": "int8-channel", "int4": "int4-group", "nf4": "nf4", "fp8": "fp8-e4m3"}


def dtype_or(name: Any, default: torch.dtype) -> torch.dtype:
    return torch_dtype(name) if name in DTYPE_ALIASES else default


def base_dtype(path: Path) -> torch.dtype:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return dtype_or(cfg.get("torch_dtype") or cfg.get("dtype") or "float32", torch.float32)
    except (OSError, ValueError, AttributeError):
        return torch.float32


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(path))


def copy_tokenizer(lm, directory: Path) -> dict[str, Any]:
    if lm.tokenizer_path is None:
        return {}
    shutil.copy(lm.tokenizer_path, directory / lm.tokenizer_path.name)
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (lm.path / extra).is_file():
            shutil.copy(lm.path / extra, directory / extra)
    return {"tokenizer_file": lm.tokenizer_path.name, "tokenizer_id": "sha256:" + sha256_file(lm.tokenizer_path)}


def base_dtype_from(qconf: dict) -> torch.dtype:
    return dtype_or(qconf.get("base_dtype", "bfloat16"), torch.bfloat16)


def half_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype of the tensors a quantized checkpoint keeps: the base's own, or bfloat16."""
    return base_dtype if base_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def save_quantized(lm, directory: Path, scheme: str, group_size: int, skip: list[str], keep_16bit: list[str],
                   info: dict, base_dtype: torch.dtype, extra: dict | None = None) -> dict[str, Any]:
    """model.safetensors (codes + companions, the rest in 16-bit), config.json with `quantization_config`
    (`module_schemes`: the layers, such as the output head, whose scheme is not `scheme`). A quantized output head
    of a tied-embedding model is stored on its own (the embedding stays 16-bit)."""
    from safetensors.torch import save_file

    half = half_dtype(base_dtype)
    qmods = quantized_modules(lm.model)
    state = {}
    for k, v in lm.model.state_dict().items():
        if k.rsplit(".", 1)[0] in qmods and not k.endswith(".bias"):
            state[k] = v
        else:
            state[k] = v.to(half) if v.is_floating_point() else v
    config = lm.config
    if config.tie_word_embeddings and HEAD in qmods:  # the head has codes of its own: the model is untied now
        config = dataclasses.replace(config, tie_word_embeddings=False)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_lm_config(config, directory, half)  # the weights below are written once, codes and all
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "gentool.quantization": scheme})
    cfg = json.loads((directory / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = dtype_name(half)
    qbits = sum(v.numel() * v.element_size() * 8 for k, v in state.items() if k.rsplit(".", 1)[0] in qmods
                and not k.endswith(".bias"))
    qweights = sum(m.in_features * m.out_features for m in qmods.values())
    n_params = sum(m.in_features * m.out_features for m in qmods.values()) + sum(
        v.numel() for k, v in state.items() if k.rsplit(".", 1)[0] not in qmods or k.endswith(".bias"))
    all_bits = sum(v.numel() * v.element_size() * 8 for v in state.values())
    skipped = [k for k in info["skipped"] if k in state]
    others = {n: s for n, s in (info.get("module_schemes") or {}).items() if n in qmods and s != scheme}
    cfg["quantization_config"] = {
        "quant_method": "gentool", "scheme": scheme, "group_size": group_size if scheme == "int4" else None,
        "skip": skip, "keep_16bit": keep_16bit, "base_dtype": dtype_name(base_dtype), **(extra or {}),
        **({"module_schemes": others} if others else {}),
        "tensors": TENSORS[scheme] if not others else "; ".join(
            f"{s}: {TENSORS[s]}" for s in dict.fromkeys([scheme, *others.values()]))}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    head = SCHEME_NAMES[others.get(HEAD, scheme)] if HEAD in qmods else dtype_name(half)
    return {"scheme": SCHEME_NAMES[scheme], "group_size": group_size if scheme == "int4" else None,
            "lm_head": head, "tensors_quantized": [f"{n}.weight" for n in qmods], "skipped": skipped,
            "bits_per_weight": qbits / max(qweights, 1), "bits_per_param": all_bits / max(n_params, 1),
            "bytes": (directory / "model.safetensors").stat().st_size, "n_params": n_params}


TENSORS = {"int8": "weight int8 (out, in); weight_scale float32 (out,): w = q * scale",
           "int4": "weight uint8 (out, in/2), two codes per byte, high nibble first; weight_scale, "
                   "weight_zero bf16 (out, in/group): w = (q - 8) * scale + zero",
           "nf4": "weight uint8 (out, in/2) NF4 codes, high nibble first, blocks of 64 row-major; "
                  "weight_absmax int8 per block, weight_absmax_scale float32 per 256 blocks, "
                  "weight_absmax_mean float32: absmax = q * scale + mean",
           "fp8": "weight float8_e4m3fn (out, in); weight_scale float32 (out,): w = q * scale"}
