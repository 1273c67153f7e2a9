"""LoRA from two checkpoints (`gentool lora-extract`) and rank resizing of an adapter (`gentool lora-resize`).

Each targeted weight's change ΔW = W_tuned − W_base is replaced by its truncated SVD U_r S_r V_rᵀ (Eckart-Young: the
best rank-r approximation in Frobenius norm), written as B = U_r √S_r, A = √S_r V_rᵀ with scaling 1 (lora_alpha =
r). With an energy threshold a module keeps the fewest singular values holding that fraction of Σ s² (at most
`rank`), and its rank goes into PEFT's rank_pattern. The report gives every module's relative reconstruction
error ‖ΔW − B A‖ / ‖ΔW‖ and, on given data, KL(TUNED ‖ base + adapter) with top-1 agreement and ΔPPL.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from gentool.adapters.combine import Source, check_fine_tunes
from gentool.adapters.methods import energy_rank, lowrank_svd, svd_factors
from gentool.adapters.peft import Base, _Lin, linear_modules, read_adapter, read_base, write_adapter
from gentool.errors import UsageProblem
from gentool.models.lora import LoRAConfig, is_target


def _check_rank(rank: int, energy: float | None) -> None:
    if rank < 1:
        raise UsageProblem(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageProblem(f"--energy {energy:g} is outside (0, 1]", hint="it is the fraction of Σ s² kept, e.g. 0.9")


def _targets(spec: str) -> list[str] | str:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise UsageProblem("--targets is empty", hint="e.g. q_proj,v_proj or all-linear")
    return "all-linear" if names == ["all-linear"] else names


def _config(ranks: dict[str, int], targets: list[str], cap: int) -> LoRAConfig:
    """Scaling 1 everywhere: r = the cap (or the most common rank), per-module ranks in rank/alpha patterns."""
    values = list(ranks.values())
    r = cap if cap in values else max(set(values), key=values.count)
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    return LoRAConfig(r=r, alpha=float(r), target_modules=targets, rank_pattern=pattern,
                      alpha_pattern={k: float(v) for k, v in pattern.items()})


def _row(module: str, s: torch.Tensor, r: int) -> dict[str, Any]:
    total = float((s.double() ** 2).sum())
    kept = float((s[:r].double() ** 2).sum())
    return {"module": module, "rank": r, "rel_error": math.sqrt(max(total - kept, 0.0) / total) if total else 0.0,
            "energy": kept / total if total else 1.0, "sigma_max": float(s[0]) if len(s) else 0.0}


def _summary(rows: list[dict]) -> dict[str, Any]:
    errs = [r["rel_error"] for r in rows]
    ranks = [r["rank"] for r in rows]
    return {"modules": len(rows), "rank_min": min(ranks), "rank_max": max(ranks), "rank_mean": sum(ranks) / len(ranks),
            "rel_error_mean": sum(errs) / len(errs), "rel_error_max": max(errs),
            "energy_mean": sum(r["energy"] for r in rows) / len(rows)}


def extract_adapter(base_path: Path, tuned_path: Path, out: Path, *, rank: int, energy: float | None = None,
                    targets: str = "all-linear", eval_data: list[str] | None = None, eval_options: dict | None = None,
                    force: bool = False, verify: bool = True) -> dict[str, Any]:
    """`gentool lora-extract BASE TUNED -o ADAPTER --rank R`."""
    from gentool.adapters.merge import BaseWeights
    from gentool.artifacts import check_output, create_artifact, input_ref
    from gentool.models.checkpoint import read_tensors

    t0 = time.perf_counter()
    check_output(out, force=force, sources=[base_path, tuned_path])
    _check_rank(rank, energy)
    target_spec = _targets(targets)
    base, tuned = read_base(base_path, verify=verify), read_base(tuned_path, verify=verify)
    if tuned.quantization:
        raise UsageProblem("TUNED is a quantized checkpoint", path=tuned.path, hint="pass the 16-bit fine-tune")
    check_fine_tunes(base, [Source(tuned.path, 1.0, tuned=tuned)], ignore=False)
    probe = LoRAConfig(target_modules=target_spec)
    modules = [m for m in linear_modules(base.shapes) if is_target(probe, m, _Lin)]
    if not modules:
        raise UsageProblem(f"--targets {targets} match no linear layer of the base", hint="e.g. q_proj,v_proj")
    for m in modules:
        if rank > min(base.shapes[f"{m}.weight"]):
            out_f, in_f = base.shapes[f"{m}.weight"]
            raise UsageProblem(f"--rank {rank} exceeds the rank of {m}'s ({out_f} x {in_f}) weight, {min(out_f, in_f)}",
                               hint=f"use --rank {min(out_f, in_f)} or lower")
    base_w, tuned_w = BaseWeights(base), read_tensors(tuned.weight_files)
    tensors, rows, ranks = {}, [], {}
    for m in modules:
        delta = tuned_w[f"{m}.weight"].float() - base_w(f"{m}.weight")
        s = torch.linalg.svdvals(delta)
        r = rank if energy is None else energy_rank(s, energy, rank)
        a, b, _ = svd_factors(delta, r, balanced=True)
        tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = a.contiguous(), b.contiguous()
        ranks[m] = r
        rows.append(_row(m, s, r))
    left = _left_out(base, base_w, tuned_w, set(modules))
    names = sorted({m.rpartition(".")[2] for m in modules}) if target_spec == "all-linear" else target_spec
    cfg = _config(ranks, names, rank)
    result = {"output": str(out), "base": str(base.path), "tuned": str(tuned.path), "r": cfg.r, **_summary(rows)}
    if left:
        from gentool.console import warn

        warn(f"{len(left)} changed tensor(s) are not linear targets and stay out of the adapter, e.g. {left[0][0]} "
             f"(relative change {left[0][1]:.3g})")
        result["not_captured"] = {k: v for k, v in left}
    inputs = [input_ref("base", base.manifest or base.path), input_ref("tuned", tuned.manifest or tuned.path)]
    with create_artifact(out, "lora-adapter", force=force, inputs=inputs,
                         config={"init": "lora-extract", "rank": rank, "energy": energy, "targets": targets}) as b:
        write_adapter(b.dir, tensors, cfg, base_name=str(base.path))
        b.contents = _contents(base, cfg, tensors, extracted_from={"id": getattr(tuned.manifest, "id", None),
                                                                  "sha256": tuned.sha256})
        if eval_data:
            result.update(_kl(tuned.path, base.path, b.dir, eval_data, eval_options or {}, verify))
        b.metrics = {**{k: v for k, v in result.items() if k not in ("output", "base", "tuned")}, "per_module": rows,
                     "seconds": round(time.perf_counter() - t0, 3)}
    result["per_module"] = rows
    return result


def _left_out(base: Base, base_w, tuned_w: dict, done: set[str]) -> list[tuple[str, float]]:
    out = []
    for k in base.shapes:
        if k.removesuffix(".weight") in done or k not in tuned_w:
            continue
        w0 = base_w(k)
        diff = float((tuned_w[k].float() - w0).norm())
        if diff > 0:
            out.append((k, diff / max(float(w0.norm()), 1e-30)))
    return sorted(out, key=lambda kv: -kv[1])


def _contents(base: Base, cfg: LoRAConfig, tensors: dict, **extra) -> dict[str, Any]:
    return {"base_id": getattr(base.manifest, "id", None), "base_sha256": base.sha256, "base_path": str(base.path),
            "base_kind": base.kind, "base_model_relation": "adapter", "r": cfg.r, "alpha": cfg.alpha,
            "target_modules": cfg.target_modules, "use_rslora": False, "use_dora": False,
            "n_trainable_params": sum(t.numel() for t in tensors.values()), **extra}


def _kl(reference: Path, base_path: Path, adapter_dir: Path, data: list[str], options: dict,
        verify: bool) -> dict[str, Any]:
    """KL(reference ‖ base + adapter) on the data, and the base's own KL against the reference for scale."""
    from gentool import console
    from gentool.adapters.peft import apply_adapter
    from gentool.evaluation.compare import damage_report
    from gentool.models.checkpoint import load_lm

    opts = dict(options)
    device, dtype = opts.pop("device", "cpu"), opts.pop("dtype", torch.float32)
    console.log("measuring KL against " + str(reference) + " on " + ", ".join(map(str, data)))
    ref = load_lm(reference, device=device, dtype=dtype, verify=False)
    with_ad = load_lm(base_path, device=device, dtype=dtype, verify=False)
    apply_adapter(with_ad.model, read_adapter(adapter_dir))
    with_ad.model.to(device)
    got = damage_report(ref, with_ad, data, device=device, dtype=dtype, verify=verify, **opts)
    with_ad.model = None
    plain = damage_report(ref, load_lm(base_path, device=device, dtype=dtype, verify=False), data, device=device,
                          dtype=dtype, verify=verify, **opts)
    return {"tokens": got["tokens"], "kl_mean": got["kl_mean"], "kl_p99": got["kl_p99"],
            "top1_agreement": got["top1_agreement"], "ppl_tuned": got["ppl_base"], "ppl_adapter": got["ppl_quant"],
            "delta_ppl_pct": got["delta_ppl_pct"], "kl_mean_base": plain["kl_mean"],
            "kl_recovered": 1 - got["kl_mean"] / plain["kl_mean"] if plain["kl_mean"] > 0 else None}


def resize_adapter(adapter_path: Path, out: Path, *, rank: int, energy: float | None = None,
                   base_path: Path | None = None, eval_data: list[str] | None = None, eval_options: dict | None = None, force: bool = False,
                   verify: bool = True) -> dict[str, Any]:
    """`gentool lora-resize ADAPTER -o OUT --rank R`: each module's s·B A truncated by SVD to rank ≤ R."""
    from gentool.artifacts import check_output, create_artifact, input_ref

    t0 = time.perf_counter()
    check_output(out, force=force, sources=[adapter_path] + ([base_path] if base_path is not None else []))
    _check_rank(rank, energy)
    ad = read_adapter(adapter_path, verify=verify)
    if ad.cfg.use_dora:
        raise UsageProblem("a DoRA adapter cannot be resized: its magnitude vector is tied to the rank-r change",
                           path=ad.path, hint="merge it, then lora-extract from the merged checkpoint")
    if not ad.lora:
        raise UsageProblem("the adapter has no LoRA modules to resize", path=ad.path)
    for m, p in ad.lora.items():
        if rank > p["A"].shape[0] and energy is None:
            raise UsageProblem(f"--rank {rank} exceeds the rank of {m}'s change, {p['A'].shape[0]}", path=ad.path,
                               hint="a LoRA change has at most its own rank; pass a lower --rank")
    if eval_data and base_path is None:
        raise UsageProblem("--eval needs --base (the adapter's base) to compare the two adapters on")
    base = read_base(base_path, verify=verify) if base_path is not None else None
    if base is not None:
        from gentool.adapters.peft import check_adapter

        check_adapter(ad, base.shapes, base_sha256=base.sha256, base_path=base.path)
    tensors, rows, ranks = {}, [], {}
    for m, p in ad.lora.items():
        u, s, vh = lowrank_svd(ad.scaling(m) * p["B"].float(), p["A"].float())
        cap = min(rank, p["A"].shape[0])
        r = cap if energy is None else energy_rank(s, energy, cap)
        root = s[:r].sqrt()
        tensors[f"{m}.lora_A.weight"] = (root[:, None] * vh[:r]).contiguous()
        tensors[f"{m}.lora_B.weight"] = (u[:, :r] * root).contiguous()
        ranks[m] = r
        rows.append(_row(m, s, r))
    for k, t in ad.saved.items():
        tensors[k] = t
    cfg = _config(ranks, ad.cfg.target_modules, rank)
    cfg.modules_to_save, cfg.layers_to_transform = list(ad.cfg.modules_to_save), ad.cfg.layers_to_transform
    result = {"output": str(out), "adapter": str(ad.path), "r": cfg.r, "r_before": ad.cfg.r, **_summary(rows)}
    with create_artifact(out, "lora-adapter", force=force, inputs=[input_ref("adapter", ad.path)],
                         config={"init": "lora-resize", "rank": rank, "energy": energy}) as b:
        write_adapter(b.dir, tensors, cfg, base_name=ad.raw_config.get("base_model_name_or_path") or "")
        b.contents = {"base_id": ad.base.get("id"), "base_sha256": ad.base.get("sha256"),
                      "base_path": ad.base.get("path"), "base_model_relation": "adapter", "r": cfg.r,
                      "alpha": cfg.alpha, "target_modules": cfg.target_modules, "use_rslora": False,
                      "use_dora": False, "resized_from": {"path": str(ad.path), "r": ad.cfg.r}}
        if eval_data:
            result.update(_resize_kl(base, ad, b.dir, eval_data, eval_options or {}, verify))
        b.metrics = {**{k: v for k, v in result.items() if k not in ("output", "adapter")}, "per_module": rows,
                     "seconds": round(time.perf_counter() - t0, 3)}
    result["per_module"] = rows
    return result


def _resize_kl(base: Base, original, resized_dir: Path, data: list[str], options: dict, verify: bool) -> dict:
    from gentool.adapters.peft import apply_adapter
    from gentool.evaluation.compare import damage_report
    from gentool.models.checkpoint import load_lm

    opts = dict(options)
    device, dtype = opts.pop("device", "cpu"), opts.pop("dtype", torch.float32)
    ref, got = (load_lm(base.path, device="cpu", verify=False) for _ in range(2))
    apply_adapter(ref.model, original)
    apply_adapter(got.model, read_adapter(resized_dir))
    ref.model.to(device), got.model.to(device)
    rep = damage_report(ref, got, data, device=device, dtype=dtype, verify=verify, **opts)
    return {"tokens": rep["tokens"], "kl_mean": rep["kl_mean"], "kl_p99": rep["kl_p99"],
            "top1_agreement": rep["top1_agreement"], "delta_ppl_pct": rep["delta_ppl_pct"]}
