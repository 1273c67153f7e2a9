"""LoRA fine-tuning with train-lm: the adapter asked for on the command line, the frozen base wrapped, and the
adapter artifact's files and manifest facts."""

from __future__ import annotations

from pathlib import Path

import torch

from gentool.adapters.peft import Base, write_adapter
from gentool.errors import UsageProblem
from gentool.models.lora import LoRAConfig

def lora_config_from_options(*, rank: int, alpha: float | None, targets: str, dropout: float = 0.0,
                             rslora: bool = False, patterns: list[str] | None = None,
                             modules_to_save: str | None = None) -> LoRAConfig:
    """The LoRAConfig asked for on the command line (train-lm's --lora-* options).

    targets: comma-separated module names (q_proj,v_proj) or "all-linear"; patterns: "REGEX=RANK[:ALPHA]" items,
    PEFT's rank_pattern/alpha_pattern ("o_proj=4", "layers\\.0\\..*=8:16", "down_proj=:32" sets alpha only).
    """
    if rank < 1:
        raise UsageProblem(f"--lora-rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise UsageProblem(f"--lora-dropout must be in [0, 1), got {dropout}")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UsageProblem("--lora-targets is empty", hint="e.g. q_proj,v_proj or all-linear")
    rank_pattern, alpha_pattern = {}, {}
    for item in patterns or []:
        key, sep, value = item.rpartition("=")
        r_txt, _, a_txt = value.partition(":")
        try:
            if not sep or not key or not (r_txt or a_txt):
                raise ValueError
            if r_txt:
                rank_pattern[key] = int(r_txt)
            if a_txt:
                alpha_pattern[key] = float(a_txt)
        except ValueError:
            raise UsageProblem(f"bad --lora-pattern {item!r}", hint="use REGEX=RANK, REGEX=RANK:ALPHA or "
                                                                    "REGEX=:ALPHA") from None
    return LoRAConfig(r=rank, alpha=float(alpha if alpha is not None else 2 * rank),
                      target_modules="all-linear" if names == ["all-linear"] else names, dropout=dropout,
                      use_rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      modules_to_save=[m.strip() for m in (modules_to_save or "").split(",") if m.strip()])


def prepare_lora(model: torch.nn.Module, cfg: LoRAConfig) -> dict:
    """Freeze the base and wrap its targets (gentool train-lm --lora-*). Returns facts for the log and manifest.

    An "all-linear" target list is spelled out as the module names it matched, so the adapter's config reads
    the same in any PEFT version.
    """
    from gentool.models.lora import count_trainable, inject_lora

    try:
        names = inject_lora(model, cfg)
    except ValueError as e:
        raise UsageProblem(str(e), hint="--lora-targets takes module names such as q_proj,v_proj or all-linear")
    if cfg.target_modules == "all-linear":
        cfg.target_modules = sorted({n.rpartition(".")[2] for n in names})
    trainable, total = count_trainable(model)
    return {"lora_modules": len(names), "n_trainable_params": trainable, "n_params": total,
            "trainable_fraction": trainable / total}


def save_lora(directory: Path, model: torch.nn.Module, cfg: LoRAConfig, *, base_name: str) -> None:
    """Write the adapter files of a LoRA-wrapped model into an artifact directory being built."""
    from gentool.models.lora import adapter_state_dict

    write_adapter(directory, adapter_state_dict(model, cfg), cfg, base_name=base_name)


def adapter_contents(cfg: LoRAConfig, info: dict, base: Base) -> dict:
    """The lora-adapter manifest's `contents`: what lora-merge and --adapter check against."""
    out = {"base_id": getattr(base.manifest, "id", None), "base_sha256": base.sha256, "base_path": str(base.path),
           "base_kind": base.kind, "base_model_relation": "adapter", "r": cfg.r, "alpha": cfg.alpha,
           "target_modules": cfg.target_modules, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
           "n_trainable_params": info["n_trainable_params"]}
    if base.quantization:  # QLoRA: the quantized base is the base; its own 16-bit original is kept for reference
        q, mc = base.quantization, base.manifest.contents if base.manifest is not None else {}
        out["base_quantization"] = {"scheme": q.get("scheme"), "group_size": q.get("group_size")}
        out["base_quantized_from"] = {"id": mc.get("base_id"), "sha256": mc.get("base_sha256")}
    return out
