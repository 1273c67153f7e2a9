"""Merging adapters into a base checkpoint (`gentool lora-merge`): W' = W + Σ w_i ΔW_i, in float32."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gentool.adapters.peft import Adapter, check_adapter, read_adapter, read_base
from gentool.artifacts.tensorfiles import load_tensors
from gentool.errors import GentoolError

BASE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")



def merge_tensors(base: dict[str, torch.Tensor], adapters: list[tuple[Adapter, float]],
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """W' = W + Σ_i w_i ΔW_i, each ΔW_i relative to the base the adapter was trained on, in float32.

    LoRA: ΔW = s·B A. DoRA: ΔW = m ⊙ (W + s·B A)/‖W + s·B A‖_row − W. modules_to_save: ΔW = M − W.
    A single full-weight adapter (DoRA or modules_to_save) at weight 1 gives its tensor exactly.
    """
    deltas: dict[str, list] = {}
    for ad, w in adapters:
        for module, p in ad.lora.items():
            key = f"{module}.weight"
            delta = ad.scaling(module) * (p["B"].float() @ p["A"].float())
            if "m" in p:
                merged = base[key].float() + delta
                merged = merged * (p["m"].float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
                deltas.setdefault(key, []).append(("full", w, merged))
            else:
                deltas.setdefault(key, []).append(("delta", w, delta))
        for key, t in ad.saved.items():
            deltas.setdefault(key, []).append(("full", w, t.float()))
    out = {}
    for key, t in base.items():
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if key not in deltas:
            out[key] = t.to(target)
            continue
        parts = deltas[key]
        if len(parts) == 1 and parts[0][0] == "full" and parts[0][1] == 1.0:
            out[key] = parts[0][2].to(target)
            continue
        w0 = t.float()
        acc = w0.clone()
        for kind, w, d in parts:
            acc += w * (d - w0 if kind == "full" else d)
        out[key] = acc.to(target)
    return out


def parse_adapter_arg(arg: str) -> tuple[Path, float]:
    """`DIR` or `DIR:WEIGHT` (the weight a float)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(arg), 1.0


def merge_checkpoint(base_path: Path, adapter_args: list[str], out: Path, *, dtype: torch.dtype | None = None,
                     force: bool = False, ignore_base_mismatch: bool = False, verify: bool = True) -> dict:
    """`gentool lora-merge`: base + Σ w_i adapter_i written as an lm-checkpoint (HF layout). Returns a summary."""
    import shutil
    import time

    from gentool.artifacts import check_output, create_artifact, input_ref

    t0 = time.perf_counter()
    specs = [parse_adapter_arg(a) for a in adapter_args]
    check_output(out, force=force, sources=[base_path, *(p for p, _ in specs)])
    base = read_base(base_path, verify=verify)
    adapters = []
    for p, w in specs:
        ad = read_adapter(p, verify=verify)
        check_adapter(ad, base.shapes, base_sha256=base.sha256, ignore_base_mismatch=ignore_base_mismatch,
                      base_path=base.path)
        if len(specs) > 1 and ad.cfg.use_dora:
            from gentool.console import warn

            warn(f"{p}: a DoRA adapter merged with others: its change is taken against the base and added")
        adapters.append((ad, w))
    tensors: dict[str, torch.Tensor] = {}
    for f in base.weight_files:
        tensors.update(load_tensors(f))
    merged = merge_tensors(tensors, adapters, dtype)
    bad = [k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GentoolError(f"the merged weight {bad[0]} has NaN/inf values", path=specs[0][0],
                           hint="the adapter is broken or its weight too large for the dtype")
    inputs = [input_ref("base", base.manifest or base.path)] + [input_ref("adapter", a.path) for a, _ in adapters]
    adapters_cfg = [{"path": str(a.path), "weight": w, "base_sha256": a.base.get("sha256")} for a, w in adapters]
    dtype_name = str(dtype).removeprefix("torch.") if dtype else None
    with create_artifact(out, "lm-checkpoint", force=force, inputs=inputs,
                         config={"init": "lora-merge", "adapters": [{"weight": w} for _, w in adapters],
                                 "dtype": dtype_name}) as b:
        for name in BASE_FILES:
            if (base.path / name).is_file():
                shutil.copyfile(base.path / name, b.dir / name)
        if dtype is not None:
            cfg = json.loads((b.dir / "config.json").read_text())
            cfg.update({"torch_dtype": dtype_name, "dtype": dtype_name})
            (b.dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in merged.items()}, str(b.dir / "model.safetensors"),
                  metadata={"format": "pt", "gentool.format": "gentool.lm-checkpoint"})
        contents = dict(base.manifest.contents) if base.manifest is not None else {"architecture": "llama"}
        contents.update(merged_adapters=adapters_cfg, base_sha256=base.sha256)
        if dtype_name:
            contents["dtype"] = dtype_name
        b.contents = contents
        b.metrics = {"merge_seconds": round(time.perf_counter() - t0, 3)}
    return {"output": str(out), "base": str(base.path), "adapters": len(adapters),
            "modules_merged": sum(len(a.lora) for a, _ in adapters),
            "tensors_replaced": sum(len(a.saved) for a, _ in adapters),
            "dtype": dtype_name or str(next(iter(merged.values())).dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - t0, 3)}
