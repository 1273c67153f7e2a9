"""`gentool lora-merge`: adapters (or fine-tuned checkpoints of one base) combined by a merging method and folded
into the base, or written as one adapter.

The default, task arithmetic, is W' = W + Σ w_i ΔW_i in float32 (ΔW = s·B A for LoRA, the change of the merged
weight for DoRA, M − W for modules_to_save). A quantized base (QLoRA) is dequantized, merged and written as a
16-bit lm-checkpoint; `requantize` quantizes the merge again with the base's scheme, and with evaluation data the
damage of the result against the unmerged adapter (KL, top-1, ΔPPL) is measured on the same tokens.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file

from gentool.adapters.combine import (Combined, Plan, Source, combine_sources, module_order, parse_source_arg,
                                      plan_merge, read_sources)
from gentool.adapters.peft import Adapter, Base, read_base, write_adapter
from gentool.artifacts.tensorfiles import cast_weight
from gentool.devices import dtype_name
from gentool.errors import GentoolError, UsageProblem
from gentool.models.lora import LoRAConfig

BASE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")
parse_adapter_arg = parse_source_arg
_NARROW = "merge with --dtype float32 or bfloat16"


def merge_tensors(base: dict[str, torch.Tensor], adapters: list[tuple[Adapter, float]],
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """W' = W + Σ_i w_i ΔW_i (task arithmetic) of adapters on a base state dict, in float32, cast to `dtype`."""
    sources = [Source(ad.path, w, adapter=ad) for ad, w in adapters]
    plan = Plan("task_arithmetic", "dense", None, False)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    combined = combine_sources(sources, plan, lambda k: base[k].float(), shapes, {k: i for i, k in enumerate(base)})
    return apply_combined(base, combined, dtype)


def apply_combined(base: dict[str, torch.Tensor], c: Combined, dtype: torch.dtype | None = None,
                   base_weight=None) -> dict[str, torch.Tensor]:
    """The merged state: each changed tensor W + ΔW (or its exact value) in float32, then cast; the rest as is."""
    base_weight = base_weight or (lambda k: base[k].float())
    out = {}
    for key, t in base.items():
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        module = key.removesuffix(".weight")
        if key in c.exact:
            w = c.exact[key]
        elif key in c.dense:
            w = base_weight(key) + c.dense[key]
        elif key.endswith(".weight") and module in c.factors:
            a, b = c.factors[module]
            w = base_weight(key) + b @ a
        else:
            w = t
        out[key] = cast_weight(key, w, target, hint=_NARROW)
    return out


def combined_adapter(c: Combined, path: Path) -> tuple[Adapter, LoRAConfig]:
    """The combined factors as one adapter (scaling 1: lora_alpha = r per module, as PEFT writes it)."""
    ranks = {m: a.shape[0] for m, (a, _) in c.factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    import re

    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    cfg = LoRAConfig(r=r, alpha=float(r), target_modules=sorted(c.factors), rank_pattern=pattern,
                     alpha_pattern={k: float(v) for k, v in pattern.items()})
    return Adapter(path, cfg, {m: {"A": a.contiguous(), "B": b.contiguous()} for m, (a, b) in c.factors.items()},
                   {}), cfg


class BaseWeights:
    """The base's tensors by name: stored tensors as they are, a quantized layer's weight dequantized (float32)."""

    def __init__(self, base: Base):
        from gentool.models.checkpoint import load_lm, read_tensors

        self.lm = None
        if base.quantization is None:
            self.state = read_tensors(base.weight_files)
            self.quant = {}
        else:
            from gentool.models.quant import quantized_modules

            self.lm = load_lm(base.path, verify=False)
            self.quant = quantized_modules(self.lm.model)
            self.state = {k: v for k, v in self.lm.model.state_dict().items()
                          if k.rsplit(".", 1)[0] not in self.quant or k.endswith(".bias")}
            for name, m in self.quant.items():
                self.state[f"{name}.weight"] = m.dequantize(torch.float32)

    def __call__(self, key: str) -> torch.Tensor:
        return self.state[key].float()


def merge_checkpoint(base_path: Path, adapter_args: list[str], out: Path, *, method: str = "task_arithmetic",
                     density: float | None = None, majority_sign: str = "total", seed: int = 0,
                     rank: int | None = None, svd_clamp: float | None = None, as_adapter: bool = False,
                     dtype: torch.dtype | None = None, requantize: bool = False, eval_data: list[str] | None = None,
                     eval_options: dict | None = None, force: bool = False, ignore_base_mismatch: bool = False,
                     verify: bool = True) -> dict[str, Any]:
    """`gentool lora-merge`: the sources combined by `method` and merged into the base (an lm-checkpoint, or a
    quantized-checkpoint with `requantize`) or written as one adapter (`as_adapter`). Returns a summary."""
    from gentool.artifacts import check_output, create_artifact, input_ref

    t0 = time.perf_counter()
    check_output(out, force=force, sources=[base_path, *(parse_source_arg(a)[0] for a in adapter_args)])
    base = read_base(base_path, verify=verify)
    if requantize and base.quantization is None:
        raise UsageProblem("--requantize applies to a quantized base", path=base.path,
                           hint="quantize the merged checkpoint with gentool quantize")
    if as_adapter and (requantize or dtype is not None or eval_data):
        raise UsageProblem("--as-adapter writes an adapter: --requantize, --dtype and --eval apply to merged "
                           "checkpoints")
    sources = read_sources(adapter_args, verify=verify)
    plan = plan_merge(base, sources, method=method, density=density, majority_sign=majority_sign, seed=seed,
                      rank=rank, svd_clamp=svd_clamp, as_adapter=as_adapter, ignore_base_mismatch=ignore_base_mismatch)
    from gentool.models.checkpoint import read_config

    config = read_config(base.path)
    weights = BaseWeights(base)
    combined = combine_sources(sources, plan, weights, base.shapes, module_order(config))
    inputs = [input_ref("base", base.manifest or base.path)] + [
        input_ref("adapter" if s.adapter is not None else "fine-tune", s.tuned.manifest if s.tuned and
                  s.tuned.manifest else s.path) for s in sources]
    recipe = {"init": "lora-merge", "method": plan.method, "sources": [{"weight": s.weight} for s in sources],
              "density": plan.density, "majority_sign": plan.majority_sign if "ties" in plan.method else None,
              "seed": plan.seed if "dare" in plan.method else None, "rank": plan.rank, "svd_clamp": plan.svd_clamp}
    summary = {"output": str(out), "base": str(base.path), "method": plan.method, "space": plan.space,
               "adapters": sum(s.adapter is not None for s in sources),
               "fine_tunes": sum(s.tuned is not None for s in sources)}
    merged_from = [{"path": str(s.path), "weight": s.weight, "base_sha256": s.adapter.base.get("sha256")
                    if s.adapter is not None else s.tuned.sha256} for s in sources]
    if as_adapter:
        ad, cfg = combined_adapter(combined, out)
        with create_artifact(out, "lora-adapter", force=force, inputs=inputs, config=recipe) as b:
            write_adapter(b.dir, {f"{m}.lora_{k}.weight": p[k] for m, p in ad.lora.items() for k in "AB"}, cfg,
                          base_name=str(base.path))
            b.contents = {"base_id": getattr(base.manifest, "id", None), "base_sha256": base.sha256,
                          "base_path": str(base.path), "base_kind": base.kind, "base_model_relation": "adapter",
                          "r": cfg.r, "alpha": cfg.alpha, "target_modules": cfg.target_modules,
                          "use_rslora": False, "use_dora": False, "merged_from": merged_from,
                          "n_trainable_params": sum(a.numel() + b.numel() for a, b in combined.factors.values())}
            b.metrics = {"merge_seconds": round(time.perf_counter() - t0, 3)}
        return {**summary, "kind": "lora-adapter", "r": cfg.r, "modules": len(ad.lora),
                "seconds": round(time.perf_counter() - t0, 3)}
    merged32 = apply_combined(weights.state, combined, torch.float32, weights)
    bad = [k for k, v in merged32.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GentoolError(f"the merged weight {bad[0]} has NaN/inf values", path=sources[0].path,
                           hint="an input is broken or its weight too large")
    kind = "quantized-checkpoint" if requantize else "lm-checkpoint"
    out_dtype = dtype or (_half(base.quantization) if base.quantization else None)
    recipe = {**recipe, "dtype": out_dtype and dtype_name(out_dtype), "requantize": requantize}
    with create_artifact(out, kind, force=force, inputs=inputs, config=recipe) as b:
        if base.quantization is None:
            _write_plain(b, base, merged32, weights.state, out_dtype)
        else:
            _write_from_quantized(b, base, config, merged32, out_dtype, requantize, "lm_head" in weights.quant)
        b.contents.update(merged_adapters=merged_from, base_sha256=base.sha256, merge_method=plan.method)
        b.metrics = {"merge_seconds": round(time.perf_counter() - t0, 3)}
        summary.update(kind=kind, modules_merged=len(combined.factors) + len([k for k in combined.dense if
                                                                              k.endswith(".weight")]),
                       tensors_replaced=len(combined.exact), dtype=b.contents.get("dtype"))
        if requantize:
            summary.update({k: b.contents[k] for k in ("scheme", "bits_per_weight", "bytes")})
        if requantize and not eval_data:
            from gentool.console import warn

            warn("re-quantized without --eval: the damage of re-quantizing the merge is not measured")
        if eval_data:
            report = _damage(base, config, sources, plan, combined, merged32, b.dir, eval_data, eval_options or {},
                             verify)
            b.metrics.update(report)
            summary.update(report)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _half(qconf: dict) -> torch.dtype:
    """The 16-bit dtype a merge onto a quantized base is written in: its original's, or bfloat16."""
    return torch.float16 if qconf.get("base_dtype") == "float16" else torch.bfloat16


def _write_plain(b, base: Base, merged32: dict, stored: dict, dtype: torch.dtype | None) -> None:
    for name in BASE_FILES:
        if (base.path / name).is_file():
            shutil.copyfile(base.path / name, b.dir / name)
    if dtype is not None:
        cfg = json.loads((b.dir / "config.json").read_text())
        cfg.update({"torch_dtype": dtype_name(dtype), "dtype": dtype_name(dtype)})
        (b.dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    out = {k: cast_weight(k, v, dtype or stored[k].dtype, hint=_NARROW).contiguous()
           for k, v in merged32.items()}
    save_file(out, str(b.dir / "model.safetensors"),
              metadata={"format": "pt", "gentool.format": "gentool.lm-checkpoint"})
    contents = dict(base.manifest.contents) if base.manifest is not None else {"architecture": "llama"}
    if dtype is not None:
        contents["dtype"] = dtype_name(dtype)
    b.contents = contents


def _model_from(config, state: dict[str, torch.Tensor]):
    from gentool.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers("cpu")
    return model.eval()


def _write_from_quantized(b, base: Base, config, merged32: dict, dtype: torch.dtype, requantize: bool,
                          head_quantized: bool) -> None:
    """The merge onto a dequantized base: 16-bit (default) or quantized again with the base's own recipe (the
    output head too, in its scheme, when the base's is quantized)."""
    from gentool.models.checkpoint import save_lm

    q = base.quantization
    mc = dict(base.manifest.contents) if base.manifest is not None else {}
    tok = {k: mc[k] for k in ("tokenizer_id", "tokenizer_file") if k in mc}
    for name in BASE_FILES[2:]:
        if (base.path / name).is_file():
            shutil.copyfile(base.path / name, b.dir / name)
    common = {"architecture": "llama", "vocab_size": config.vocab_size,
              "context_length": config.max_position_embeddings, **tok}
    if not requantize:
        save_lm(merged32, config, b.dir, dtype=dtype, metadata={"gentool.format": "gentool.lm-checkpoint"})
        b.contents = {**common, "n_params": config.n_params(), "dtype": dtype_name(dtype),
                      "n_params_non_embedding": config.n_params(non_embedding=True),
                      "dequantized_from": q.get("scheme")}
        return
    from gentool.models.quant import keep_16bit_patterns, quantize_model
    from gentool.quantize import save_quantized

    # the float32 merge is quantized; save_quantized rounds the tensors it keeps to 16-bit
    lm = SimpleNamespace(model=_model_from(config, merged32), config=config)
    keep = keep_16bit_patterns(q.get("keep_16bit") or [], config.num_hidden_layers)
    skip, gs = list(q.get("skip") or []), q.get("group_size") or 128
    head = (q.get("module_schemes") or {}).get("lm_head", q["scheme"]) if head_quantized else "float"
    info = quantize_model(lm.model, q["scheme"], group_size=gs, skip=skip, keep_16bit=keep, head=head)
    base_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(q.get("base_dtype"), torch.float32)
    stats = save_quantized(lm, b.dir, q["scheme"], gs, skip, q.get("keep_16bit") or [], info, base_dtype)
    b.contents = {**common, "base_model_relation": "quantized", "base_id": getattr(base.manifest, "id", None),
                  **stats}


def _damage(base: Base, config, sources: list[Source], plan: Plan, combined: Combined, merged32: dict,
            written: Path, data: list[str], options: dict, verify: bool) -> dict[str, Any]:
    """The written merge against the unmerged adapter on the same tokens (evaluation/compare.py's figures).

    The reference is the base (quantized layers as stored) with the adapter's LoRA layers, unmerged: exactly what
    was trained, when there is one adapter at weight 1 or the method produced one adapter; otherwise (a weighted
    or dense merge of several inputs) it is the merge kept in float32."""
    from gentool import console
    from gentool.adapters.peft import apply_adapter
    from gentool.evaluation.compare import damage_report
    from gentool.models.checkpoint import LoadedLM, load_lm

    opts = dict(options)
    device, dtype = opts.pop("device", "cpu"), opts.pop("dtype", torch.float32)
    ref = load_lm(base.path, device="cpu", verify=False)
    single = [s for s in sources if s.adapter is not None]
    if plan.method == "task_arithmetic" and len(sources) == 1 and single and sources[0].weight == 1.0:
        apply_adapter(ref.model, single[0].adapter)
        what = "base + adapter (unmerged)"
    elif combined.factors and not combined.dense and not combined.exact:
        apply_adapter(ref.model, combined_adapter(combined, written)[0])
        what = "base + combined adapter (unmerged)"
    else:
        ref = LoadedLM(_model_from(config, merged32), config, ref.path, ref.tokenizer_path, ref.manifest, ref.source)
        what = "the merge in float32"
    ref.model.to(device)
    console.log(f"measuring the damage against {what} on " + ", ".join(map(str, data)))
    got = load_lm(written, device=device, dtype=dtype, verify=False)
    if got.tokenizer_path is None:
        got.tokenizer_path = ref.tokenizer_path
    report = damage_report(ref, got, data, device=device, dtype=dtype, verify=verify, **opts)
    return {"reference": what, **report}
