"""`gentool quantize`: write a quantized-checkpoint (or a dequantized LM checkpoint) and measure the damage.

The damage report compares base and quantized model on the same tokens and windows, with the figures llama.cpp's
`perplexity --kl-divergence` prints: perplexity of both and its relative change, mean and 99th-percentile
KL(base ‖ quant) of the next-token distributions, top-1 agreement; plus size and bits per weight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.artifacts import MANIFEST, check_output, create_artifact, input_ref, read_artifact, sha256_file
from gentool.devices import DTYPE_ALIASES, dtype_name, torch_dtype
from gentool.errors import UsageProblem
from gentool.evaluation.compare import damage_report
from gentool.models.checkpoint import load_lm, quantization_config, save_lm, weight_files
from gentool.models.quant import (DEFAULT_SKIP, dequantize_model, keep_16bit_patterns, quantize_model,
                                  quantized_modules)
from gentool.codecs.quant import INT4_GROUP_SIZES, SCHEMES

SCHEME_NAMES = {"int8": "int8-channel", "int4": "int4-group", "nf4": "nf4", "fp8": "fp8-e4m3"}


def _dtype_or(name: Any, default: torch.dtype) -> torch.dtype:
    return torch_dtype(name) if name in DTYPE_ALIASES else default


def _base_dtype(path: Path) -> torch.dtype:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return _dtype_or(cfg.get("torch_dtype") or cfg.get("dtype") or "float32", torch.float32)
    except (OSError, ValueError, AttributeError):
        return torch.float32


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(path))


def _copy_tokenizer(lm, directory: Path) -> dict[str, Any]:
    if lm.tokenizer_path is None:
        return {}
    shutil.copy(lm.tokenizer_path, directory / lm.tokenizer_path.name)
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (lm.path / extra).is_file():
            shutil.copy(lm.path / extra, directory / extra)
    return {"tokenizer_file": lm.tokenizer_path.name, "tokenizer_id": "sha256:" + sha256_file(lm.tokenizer_path)}


def check_options(scheme: str, group_size: int | None) -> int:
    if scheme not in SCHEMES:
        raise UsageProblem(f"unknown scheme {scheme!r}", hint="use --scheme " + ", ".join(SCHEMES))
    if group_size is not None and scheme != "int4":
        raise UsageProblem(f"--group-size applies to int4 only ({scheme} uses "
                           f"{'blocks of 64' if scheme == 'nf4' else 'one scale per output row'})")
    group_size = group_size or 128
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise UsageProblem(f"group size {group_size} is not supported",
                           hint="use --group-size " + ", ".join(map(str, INT4_GROUP_SIZES)))
    return group_size


def quantize_checkpoint(ckpt: Path, out: Path, *, scheme: str | None, group_size: int | None = None,
                        skip: list[str] | None = None, keep_16bit: list[str] | None = None, dequantize: bool = False,
                        eval_data: list[str] | None = None, eval_options: dict | None = None, force: bool = False,
                        verify: bool = True) -> dict[str, Any]:
    ckpt = Path(ckpt)
    check_output(out, force=force, sources=[ckpt, *(eval_data or [])])
    qconf = quantization_config(ckpt) if ckpt.is_dir() else None
    if qconf is not None and not dequantize:
        raise UsageProblem(f"the checkpoint is already quantized ({qconf.get('scheme')})", path=ckpt,
                           hint="quantize the 16-bit original, or pass --dequantize to write it back as an LM "
                                "checkpoint")
    if qconf is None and scheme is None:
        raise UsageProblem("no --scheme given", hint="use --scheme int8, int4, nf4 or fp8")
    if qconf is None:
        group_size = check_options(scheme, group_size)
    elif scheme is not None:
        raise UsageProblem("--scheme with --dequantize of a quantized checkpoint", path=ckpt,
                           hint="drop --scheme: the checkpoint's own scheme is undone")
    skip = list(DEFAULT_SKIP if skip is None else skip)
    manifest = read_artifact(ckpt, verify=verify) if (ckpt / MANIFEST).is_file() else None
    lm = load_lm(ckpt, verify=verify)  # float32; a quantized checkpoint comes with its quantized layers
    base_dtype = _base_dtype(ckpt) if qconf is None else _base_dtype_from(qconf)
    info = {}
    if qconf is None:
        keep = keep_16bit_patterns(keep_16bit or [], lm.config.num_hidden_layers)
        info = quantize_model(lm.model, scheme, group_size=group_size, skip=skip, keep_16bit=keep)
        if not info["quantized"]:
            raise UsageProblem("--skip and --keep-16bit leave no layer to quantize")
    recipe = ({"dequantize": True} if qconf is not None else
              {"scheme": SCHEME_NAMES[scheme], "group_size": group_size if scheme == "int4" else None,
               "symmetric": scheme in ("int8", "fp8"), "skip": skip, "keep_16bit": list(keep_16bit or []),
               "calibration": None, "dequantize": dequantize})
    inputs = [input_ref("base", manifest or ckpt)]
    kind = "lm-checkpoint" if dequantize else "quantized-checkpoint"
    with create_artifact(out, kind, force=force, config=recipe, inputs=inputs) as art:
        tok = _copy_tokenizer(lm, art.dir)
        if dequantize:
            if qconf is None:  # what the quantized checkpoint would hold: the kept tensors rounded to 16-bit
                qmods = quantized_modules(lm.model)
                with torch.no_grad():
                    for k, t in lm.model.state_dict().items():
                        if t.is_floating_point() and (k.rsplit(".", 1)[0] not in qmods or k.endswith(".bias")):
                            t.copy_(t.to(_half(base_dtype)))
            dequantize_model(lm.model)
            save_lm(lm.model, lm.config, art.dir, dtype=base_dtype)
            art.contents.update(architecture="llama", n_params=lm.config.n_params(), vocab_size=lm.config.vocab_size,
                                n_params_non_embedding=lm.config.n_params(non_embedding=True),
                                context_length=lm.config.max_position_embeddings,
                                dtype=dtype_name(base_dtype), **tok,
                                dequantized_from=(qconf or {}).get("scheme", SCHEME_NAMES.get(scheme)))
            result = {"output": str(out), "kind": kind, "dequantized": True}
        else:
            stats = save_quantized(lm, art.dir, scheme, group_size, skip, keep_16bit or [], info, base_dtype)
            base_bytes = _weights_bytes(ckpt)
            base_sha = (manifest.files.get("model.safetensors", {}).get("sha256") if manifest else None)
            art.contents.update(architecture="llama", base_model_relation="quantized",
                                base_id=manifest.id if manifest else inputs[0].get("sha256"), base_sha256=base_sha
                                or inputs[0].get("sha256"), base_bytes=base_bytes,
                                compression_ratio=base_bytes / stats["bytes"], vocab_size=lm.config.vocab_size,
                                context_length=lm.config.max_position_embeddings, **tok, **stats)
            result = {"output": str(out), "scheme": SCHEME_NAMES[scheme], "group_size": recipe["group_size"],
                      "layers_quantized": len(info["quantized"]), "tensors_16bit": len(stats["skipped"]),
                      "bits_per_weight": stats["bits_per_weight"], "bits_per_param": stats["bits_per_param"],
                      "bytes": stats["bytes"], "base_bytes": base_bytes, "compression_ratio": base_bytes / stats["bytes"]}
        lm.model = None  # free it before loading the two models to compare
        if eval_data:
            console.log("measuring the damage on " + ", ".join(map(str, eval_data)))
            opts = dict(eval_options or {})
            device, dtype = opts.pop("device", "cpu"), opts.pop("dtype", torch.float32)
            base = load_lm(ckpt, device=device, dtype=dtype, verify=False)
            quant = load_lm(art.dir, device=device, dtype=dtype, verify=False)
            report = damage_report(base, quant, eval_data, device=device, dtype=dtype, verify=verify, **opts)
            art.metrics.update(report)
            result.update(report)
    return result


def _base_dtype_from(qconf: dict) -> torch.dtype:
    return _dtype_or(qconf.get("base_dtype", "bfloat16"), torch.bfloat16)


def _half(base_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype of the tensors a quantized checkpoint keeps: the base's own, or bfloat16."""
    return base_dtype if base_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def save_quantized(lm, directory: Path, scheme: str, group_size: int, skip: list[str], keep_16bit: list[str],
                   info: dict, base_dtype: torch.dtype) -> dict[str, Any]:
    """model.safetensors (codes + companions, the rest in 16-bit), config.json with `quantization_config`."""
    from safetensors.torch import save_file

    half = _half(base_dtype)
    qmods = quantized_modules(lm.model)
    state = {}
    for k, v in lm.model.state_dict().items():
        if k.rsplit(".", 1)[0] in qmods and not k.endswith(".bias"):
            state[k] = v
        else:
            state[k] = v.to(half) if v.is_floating_point() else v
    if lm.config.tie_word_embeddings and "lm_head" not in qmods:
        state.pop("lm_head.weight", None)
    save_lm(state, lm.config, directory)  # config.json + generation_config.json (+ weights, rewritten below)
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
    cfg["quantization_config"] = {
        "quant_method": "gentool", "scheme": scheme, "group_size": group_size if scheme == "int4" else None,
        "skip": skip, "keep_16bit": keep_16bit, "base_dtype": dtype_name(base_dtype),
        "tensors": {"int8": "weight int8 (out, in); weight_scale float32 (out,): w = q * scale",
                    "int4": "weight uint8 (out, in/2), two codes per byte, high nibble first; weight_scale, "
                            "weight_zero bf16 (out, in/group): w = (q - 8) * scale + zero",
                    "nf4": "weight uint8 (out, in/2) NF4 codes, high nibble first, blocks of 64 row-major; "
                           "weight_absmax int8 per block, weight_absmax_scale float32 per 256 blocks, "
                           "weight_absmax_mean float32: absmax = q * scale + mean",
                    "fp8": "weight float8_e4m3fn (out, in); weight_scale float32 (out,): w = q * scale"}[scheme]}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"scheme": SCHEME_NAMES[scheme], "group_size": group_size if scheme == "int4" else None,
            "tensors_quantized": [f"{n}.weight" for n in qmods], "skipped": skipped,
            "bits_per_weight": qbits / max(qweights, 1), "bits_per_param": all_bits / max(n_params, 1),
            "bytes": (directory / "model.safetensors").stat().st_size, "n_params": n_params}
