"""GGML schemes of `gentool quantize` (q4_0 … q8_0, q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, iq4_xs, ...):
llama-quantize's per-tensor types, the blocks made by codecs.ggml (bit-identical to llama-quantize's, with or
without an importance matrix), the layers swapped into the model, and the quantized-checkpoint written with the
GGUF bytes themselves.

Checkpoint layout (config.json `quantization_config`, scheme "ggml"): `tensor_types` maps every Hugging Face tensor
name to its GGML type; a block-quantized tensor is stored as `<name>` uint8 (rows, row_bytes), the GGUF bytes in
Hugging Face row order (export-gguf permutes q/k rows, which commutes with row-wise blocks); F32 and F16 tensors
as float32 / float16. A tied output head is the embedding's bytes, stored once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gentool import console
from gentool.artifacts.tensorfiles import cast_weight
from gentool.codecs import ggml
from gentool.codecs.ggml_mixes import _ALIASES, MIXES, allows_quantization, mix_info, tensor_types
from gentool.codecs.gguf_names import gguf_name, hf_name
from gentool.devices import dtype_name
from gentool.errors import GentoolError, UsageProblem
from gentool.models.quant_ggml import FLOAT_TYPES, SUPPORTED, install_ggml

GGML_SCHEMES = tuple(MIXES) + tuple(_ALIASES)
KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")  # what --target-kl chooses from (with llama.cpp's fallbacks)


def is_ggml(scheme: str | None) -> bool:
    return scheme is not None and scheme.lower() in GGML_SCHEMES


def weight_shapes(model: torch.nn.Module, config) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a GGUF holds (a tied output head only as the embedding)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if gguf_name(k) is None:
            raise UsageProblem(f"tensor {k} has no GGUF name", hint="GGML schemes cover Llama-architecture models")
        out[k] = tuple(v.shape)
    return out


def explicit_type(option: str, qtype: str | None) -> str | None:
    """A GGML type named on the command line (--output-tensor-type, --token-embedding-type), upper-cased."""
    if qtype is None:
        return None
    if qtype.upper() not in SUPPORTED + FLOAT_TYPES:
        raise UsageProblem(f"{option} {qtype}: gentool has no codec for this type",
                           hint="use one of " + ", ".join(SUPPORTED + FLOAT_TYPES))
    return qtype.upper()


def plan_types(shapes: dict[str, tuple[int, ...]], mix: str, *, n_layer: int, n_head: int, n_kv: int,
               overrides=(), has_imatrix: bool = False, output_type: str | None = None,
               token_embd_type: str | None = None, pure: bool = False) -> dict[str, str]:
    """llama-quantize's type for every tensor (Hugging Face names), --tensor-type overrides and fallbacks included.
    `overrides` are "PATTERN=TYPE" strings, matched against GGUF names as llama-quantize does; `output_type`,
    `token_embd_type` and `pure` are its --output-tensor-type, --token-embedding-type and --pure."""
    from gentool.codecs.ggml_mixes import parse_tensor_type

    parsed = [parse_tensor_type(o) for o in overrides]
    for _, t in parsed:
        if t not in SUPPORTED + FLOAT_TYPES:
            raise UsageProblem(f"--tensor-type type {t} cannot be written by gentool",
                               hint="use one of " + ", ".join(SUPPORTED + FLOAT_TYPES))
    output_type = explicit_type("--output-tensor-type", output_type)
    token_embd_type = explicit_type("--token-embedding-type", token_embd_type)
    gg = {gguf_name(k): s for k, s in shapes.items()}
    for name, shape in gg.items():  # an explicit choice that does not fit is an error; the mixes fall back
        t = next((t for pattern, t in parsed if pattern.search(name)), None)
        t = {"output.weight": output_type, "token_embd.weight": token_embd_type}.get(name) or t
        if t is not None and t not in FLOAT_TYPES and allows_quantization(name, shape):
            ggml.check_fits(t, shape, name)
    types = tensor_types(gg, mix, n_layer=n_layer, n_head=n_head, n_head_kv=n_kv, overrides=parsed,
                         has_imatrix=has_imatrix, output_type=output_type, token_embd_type=token_embd_type,
                         pure=pure)
    block = ggml.block_size(mix_info(mix)[1])
    odd = [k for k, s in gg.items() if allows_quantization(k, s) and s[-1] % block]
    if odd:
        console.log(f"{len(odd)} tensors have rows that {mix_info(mix)[1]}'s blocks of {block} do not divide (e.g. "
                    f"{odd[0]}: {gg[odd[0]][-1]}); they get llama-quantize's fallback types")
    return {hf_name(k): t for k, t in types.items()}


def plan_for(model: torch.nn.Module, config, mix: str, **kw) -> dict[str, str]:
    return plan_types(weight_shapes(model, config), mix, n_layer=config.num_hidden_layers,
                      n_head=config.num_attention_heads, n_kv=config.num_key_value_heads, **kw)


def quantize_tensor(w: torch.Tensor, qtype: str, name: str, imatrix: np.ndarray | None = None) -> torch.Tensor:
    """GGUF bytes (rows, row_bytes) of a float weight (rows = output features); refused by name when a block's
    float16 scale overflows (a weight far beyond 65504)."""
    w = w.detach().float().cpu().numpy()
    raw = ggml.quantize(w, qtype, imatrix=imatrix, name=gguf_name(name) or name)
    if not ggml.scales_finite(raw, qtype):
        raise GentoolError(f"tensor {name} holds {float(np.abs(w).max()):.6g}: its {qtype} block scales overflow "
                           "float16", hint=f"keep it in 32 bits (--tensor-type {gguf_name(name) or name}=f32)")
    return torch.from_numpy(raw)


@torch.no_grad()
def quantize_model_ggml(model: torch.nn.Module, types: dict[str, str], *, imatrix: dict[str, np.ndarray] | None = None,
                        dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """Quantize every tensor `types` gives a block type and swap in its GGML layer, in place; F16 tensors are
    rounded to float16 (what the checkpoint and the GGUF hold). Returns the tensors quantized and kept."""
    imatrix = imatrix or {}
    params = model.state_dict()
    raw: dict[str, torch.Tensor] = {}
    blocks = [(k, t) for k, t in types.items() if t not in FLOAT_TYPES]
    with console.progress("quantizing", total=len(blocks)) as bar:
        for k, t in blocks:
            raw[k] = quantize_tensor(params[k], t, k, imatrix.get(k))
            bar.update(1)
    for k, t in types.items():
        if t == "F16":
            params[k].copy_(cast_weight(k, params[k], torch.float16, hint=f"keep it in 32 bits (--tensor-type "
                                        f"{gguf_name(k) or k}=f32)").float())
    install_ggml(model, raw, {"tensor_types": types}, dtype=dtype)
    return {"quantized": [k for k, _ in blocks], "kept": [k for k, t in types.items() if t in FLOAT_TYPES]}


def ggml_state(model: torch.nn.Module, types: dict[str, str]) -> dict[str, torch.Tensor]:
    """What the checkpoint stores: GGUF bytes of block tensors, float32 / float16 of the others."""
    sd = model.state_dict()
    out = {}
    for k, t in types.items():
        v = sd[k]
        out[k] = v.contiguous().cpu() if t not in FLOAT_TYPES else v.detach().to(
            torch.float16 if t == "F16" else torch.float32).contiguous().cpu()
    return out


def bits(types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Bits per block-quantized weight, and bits per parameter of the whole model (llama.cpp's BPW)."""
    qb = qn = ab = an = 0
    for k, t in types.items():
        n = int(np.prod(shapes[k]))
        b = 8 * ggml.row_bytes(t, shapes[k][-1]) * (n // shapes[k][-1])
        an, ab = an + n, ab + b
        if t not in FLOAT_TYPES:
            qn, qb = qn + n, qb + b
    return {"bits_per_weight": qb / max(qn, 1), "bits_per_param": ab / max(an, 1), "weights_quantized": qn}


def save_ggml(model: torch.nn.Module, config, directory: Path, types: dict[str, str], *, mix: str,
              base_dtype: torch.dtype, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    shapes = config_shapes(config)
    return write_checkpoint(directory, config, ggml_state(model, types), types, {k: shapes[k] for k in types},
                            mix=mix, base_dtype=base_dtype, extra=extra)


def config_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> float shape of every tensor of a model of this config (from a meta-device model)."""
    from gentool.models.transformer import Transformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}


def write_checkpoint(directory: Path, config, state: dict[str, torch.Tensor], types: dict[str, str],
                     shapes: dict[str, tuple[int, ...]], *, mix: str, base_dtype: torch.dtype,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json (+ quantization_config), generation_config.json and model.safetensors of a GGML checkpoint."""
    from safetensors.torch import save_file

    from gentool.models.checkpoint import save_lm_config

    save_lm_config(config, directory, torch.float32)  # dtypes set below
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "gentool.quantization": "ggml"})
    cfg = json.loads((directory / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        cfg[key] = "float32"
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    name, _, file_type = mix_info(mix) if mix in GGML_SCHEMES else (mix, None, None)
    cfg["quantization_config"] = {
        "quant_method": "gentool", "scheme": "ggml", "mix": name, "file_type": file_type,
        "base_dtype": dtype_name(base_dtype), "tensor_types": dict(sorted(types.items())), **(extra or {}),
        "tensors": "block types: <name> uint8 (rows, row_bytes), GGUF bytes in Hugging Face row order (q/k not "
                   "permuted); F32/F16: float32/float16"}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"scheme": name, "type_counts": dict(sorted(counts.items())), **bits(types, shapes),
            "tensors_quantized": sorted(k for k, t in types.items() if t not in FLOAT_TYPES),
            "bytes": (directory / "model.safetensors").stat().st_size}
