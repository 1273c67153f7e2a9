"""LoRA adapters in PEFT's on-disk format: reading, checking against a base, writing, applying to a model.

An adapter directory holds `adapter_config.json` (a PEFT LoraConfig) and `adapter_model.safetensors` whose keys are
the model's own names behind PEFT's prefix: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
gentool's `lora-adapter` artifact adds a manifest that records the base checkpoint (artifact id and weights sha256).
Adapters written by PEFT itself read the same way; what gentool does not handle is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from gentool.artifacts.tensorfiles import load_tensors, read_header
from gentool.errors import GentoolError, UsageProblem
from gentool.models.lora import LoRAConfig, in_modules_to_save, is_target, rank_alpha

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# PEFT LoraConfig fields that change the weights in ways gentool does not implement: refused, never dropped.
# field -> (value meaning "not used", what to call it)
_UNSUPPORTED = {
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style transposed weights)"),
    "bias": ("none", "trained biases (bias)"),
    "lora_bias": (False, "trained LoRA biases (lora_bias)"),
    "layer_replication": (None, "layer_replication"),
    "trainable_token_indices": (None, "trainable_token_indices"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters)"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "use_qalora": (False, "QALoRA (use_qalora)"),
    "use_bdlora": (None, "block-diagonal LoRA (use_bdlora)"),
    "arrow_config": (None, "Arrow routing (arrow_config)"),
    "megatron_config": (None, "Megatron parallel layers (megatron_config)"),
    "modules_to_tie": (None, "modules_to_tie"),
}


@dataclass
class Adapter:
    path: Path
    cfg: LoRAConfig
    lora: dict[str, dict[str, torch.Tensor]]   # module name -> {"A": (r, in), "B": (out, r), "m": (out,) for DoRA}
    saved: dict[str, torch.Tensor]              # full tensors of modules_to_save, by parameter name
    base: dict = field(default_factory=dict)    # {"id", "sha256", "path"} when written by gentool
    raw_config: dict = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        r = self.lora[module]["A"].shape[0]
        return self.cfg.scaling(r, rank_alpha(self.cfg, module)[1])


def config_from_peft(d: dict, where: Path) -> LoRAConfig:
    """A LoRAConfig from a PEFT adapter_config.json, refusing (by name) anything gentool would get wrong."""
    peft_type = d.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UsageProblem(f"adapter type {peft_type} is not supported (only LoRA, rsLoRA and DoRA)", path=where)
    for key, (unused, what) in _UNSUPPORTED.items():
        value = d.get(key)
        if value is not None and value != unused and value not in (False, {}, []):
            raise UsageProblem(f"{what} = {value!r} is not supported", path=where,
                               hint="merge it with peft's merge_and_unload instead")
    try:
        return LoRAConfig(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)),
                          target_modules=d.get("target_modules") if isinstance(d.get("target_modules"), str)
                          else sorted(d.get("target_modules") or []),
                          dropout=float(d.get("lora_dropout") or 0.0), use_rslora=bool(d.get("use_rslora")),
                          use_dora=bool(d.get("use_dora")), rank_pattern=dict(d.get("rank_pattern") or {}),
                          alpha_pattern=dict(d.get("alpha_pattern") or {}),
                          modules_to_save=list(d.get("modules_to_save") or []),
                          layers_to_transform=_layers(d.get("layers_to_transform")))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageProblem(f"malformed {ADAPTER_CONFIG} ({type(e).__name__}: {e})", path=where) from None


def _layers(v) -> list[int] | None:
    return None if v is None else [v] if isinstance(v, int) else [int(i) for i in v]


def config_to_peft(cfg: LoRAConfig, *, base_name: str) -> dict:
    """adapter_config.json as PEFT writes it (the keys PeftModel.from_pretrained needs, defaults spelled out)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": cfg.r, "lora_alpha": cfg.alpha, "target_modules": cfg.target_modules, "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "rank_pattern": cfg.rank_pattern,
            "alpha_pattern": cfg.alpha_pattern, "modules_to_save": cfg.modules_to_save or None,
            "layers_to_transform": cfg.layers_to_transform, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True}


def read_adapter(path: str | Path, *, verify: bool = True) -> Adapter:
    """Read a gentool lora-adapter artifact or a directory written by PEFT's save_pretrained."""
    path = Path(path)
    base: dict = {}
    if (path / "manifest.json").is_file():
        from gentool.artifacts import read_artifact

        manifest = read_artifact(path, "lora-adapter", verify=verify)
        c = manifest.contents
        base = {"id": c.get("base_id"), "sha256": c.get("base_sha256"), "path": c.get("base_path"),
                "quantized_from": (c.get("base_quantized_from") or {}).get("sha256")}
    elif not path.is_dir():
        raise UsageProblem("no such adapter directory", path=path, hint="pass a lora-adapter or PEFT adapter directory")
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        hint = "PEFT's .bin adapters are pickle; re-save with safe_serialization=True" \
            if (path / "adapter_model.bin").exists() else "pass a lora-adapter or PEFT adapter directory"
        raise UsageProblem(f"no {ADAPTER_CONFIG}: not an adapter directory", path=path, hint=hint)
    if not weights.is_file():
        raise UsageProblem(f"no {ADAPTER_WEIGHTS}", path=path, hint="PEFT writes it with safe_serialization=True")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageProblem(f"cannot read {ADAPTER_CONFIG} ({e})", path=cfg_file) from None
    if not isinstance(raw, dict):
        raise UsageProblem(f"{ADAPTER_CONFIG} is not a JSON object", path=cfg_file)
    cfg = config_from_peft(raw, cfg_file)
    tensors = load_tensors(weights)
    lora, saved = _split(tensors, cfg, weights)
    return Adapter(path=path, cfg=cfg, lora=lora, saved=saved, base=base, raw_config=raw)


_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
          ".lora_magnitude_vector.weight": "m"}


def _split(tensors: dict, cfg: LoRAConfig, where: Path) -> tuple[dict, dict]:
    lora: dict[str, dict] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, part in _PARTS.items():
            if name.endswith(suffix):
                lora.setdefault(name[:-len(suffix)], {})[part] = t
                break
        else:
            if ".lora_embedding_" in name:
                raise UsageProblem(f"LoRA on embedding layers is not supported ({key})", path=where)
            if ".lora_B.bias" in name or ".lora_A.bias" in name:
                raise UsageProblem(f"trained LoRA biases are not supported ({key})", path=where)
            if in_modules_to_save(cfg, name.rpartition(".")[0]):
                saved[name] = t
            else:
                raise UsageProblem(f"unexpected tensor {key} in the adapter", path=where,
                                   hint="it is neither a LoRA tensor nor part of modules_to_save")
    for module, parts in lora.items():
        need = {"A", "B"} | ({"m"} if cfg.use_dora else set())
        if set(parts) != need:
            missing, extra = sorted(need - set(parts)), sorted(set(parts) - need)
            what = f"lacks {'/'.join(missing)}" if missing else f"has an unexpected {'/'.join(extra)}"
            raise UsageProblem(f"adapter tensors for {module} {what} (lora_A, lora_B"
                               f"{', lora_magnitude_vector' if cfg.use_dora else ''} expected)", path=where)
        a, b = parts["A"], parts["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UsageProblem(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a "
                               f"low-rank pair", path=where)
        r_cfg = rank_alpha(cfg, module)[0]
        if a.shape[0] != r_cfg:
            raise UsageProblem(f"{module}: tensors have rank {a.shape[0]}, adapter_config.json says {r_cfg}",
                               path=where, hint="check r and rank_pattern")
    return lora, saved


def linear_modules(shapes: dict[str, tuple]) -> list[str]:
    """Module names of the 2-D `.weight` tensors of a Llama state dict, embeddings excluded."""
    return [k[:-len(".weight")] for k, s in shapes.items()
            if k.endswith(".weight") and len(s) == 2 and not k.endswith("embed_tokens.weight")]


def check_adapter(ad: Adapter, shapes: dict[str, tuple], *, base_sha256: str | None = None,
                  base_id: str | None = None, ignore_base_mismatch: bool = False, base_path: Path | None = None):
    """Refuse, before any work, an adapter that does not fit this base (shapes, targets, tensors, identity)."""
    where = ad.path
    if ad.base.get("sha256") and base_sha256 and ad.base["sha256"] != base_sha256:
        msg = (f"adapter was trained on a base with weights sha256 {ad.base['sha256'][:12]}…, this base "
               f"{base_path or ''} has {base_sha256[:12]}…")
        if not ignore_base_mismatch:
            raise UsageProblem(msg, path=where, hint="pass the adapter's base, or --ignore-base-mismatch")
        from gentool.console import warn

        warn(msg + " (ignored)")
    present = set(ad.lora)
    for module in sorted(present):
        if f"{module}.weight" not in shapes:
            raise UsageProblem(f"adapter targets {module}, which the base does not have", path=where,
                               hint="the adapter belongs to a different architecture")
        out_f, in_f = shapes[f"{module}.weight"]
        a, b = ad.lora[module]["A"], ad.lora[module]["B"]
        if a.shape[1] != in_f or b.shape[0] != out_f or ("m" in ad.lora[module] and
                                                          tuple(ad.lora[module]["m"].shape) != (out_f,)):
            raise UsageProblem(f"{module}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the "
                               f"base weight ({out_f}, {in_f})", path=where, hint="pass the adapter's base")
    expected = {m for m in linear_modules(shapes) if is_target(ad.cfg, m, _Lin)}
    if not ad.cfg.target_modules and not ad.cfg.modules_to_save:
        expected = present
    if missing := sorted(expected - present):
        raise UsageProblem(f"adapter file lacks the LoRA tensors of {len(missing)} targeted module(s), e.g. "
                           f"{missing[0]}", path=where, hint="the adapter file is incomplete")
    if extra := sorted(present - expected):
        raise UsageProblem(f"adapter holds tensors for {extra[0]}, which its target_modules do not name",
                           path=where, hint="the adapter_config.json does not belong to these weights")
    for name, t in ad.saved.items():
        if name not in shapes:
            raise UsageProblem(f"modules_to_save tensor {name} is not in the base", path=where)
        if tuple(t.shape) != tuple(shapes[name]):
            raise UsageProblem(f"{name}: adapter shape {tuple(t.shape)} != base {tuple(shapes[name])}", path=where)
    for m in ad.cfg.modules_to_save:
        want = {k for k in shapes if in_modules_to_save(LoRAConfig(modules_to_save=[m]), k.rpartition(".")[0])}
        if not want:
            raise UsageProblem(f"modules_to_save names {m}, which the base does not have", path=where)
        if lacking := sorted(want - set(ad.saved)):
            raise UsageProblem(f"adapter file lacks {lacking[0]} (listed in modules_to_save)", path=where)


class _Lin:
    """Stands in for a linear module when matching names of a state dict (is_linear is true for it)."""
    in_features = out_features = 0

    @staticmethod
    def dequantize():
        return None


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], cfg: LoRAConfig, *, base_name: str) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT key names) into `directory`."""
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config_to_peft(cfg, base_name=base_name), indent=2,
                                                       sort_keys=True) + "\n", encoding="utf-8")
    sd = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(sd, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt", "gentool.format": "gentool.lora-adapter"})


def model_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """Tensor shapes under HF names; a (quantized) linear layer counts as its dense (out, in) weight."""
    from gentool.models.lora import LoRALinear, base_state_dict, is_linear

    shapes = {k: tuple(v.shape) for k, v in base_state_dict(model).items()}
    for name, m in model.named_modules():
        if is_linear(m) and not isinstance(m, LoRALinear) and not name.endswith((".lora_A", ".lora_B")):
            shapes[f"{name.replace('.base_layer', '')}.weight"] = (m.out_features, m.in_features)
    return shapes


def apply_adapter(model: torch.nn.Module, ad: Adapter) -> list[str]:
    """Wrap `model` with the adapter's LoRA layers and load its tensors (base + adapter, unmerged)."""
    from gentool.models.lora import inject_lora

    check_adapter(ad, model_shapes(model))
    names = inject_lora(model, ad.cfg, only=set(ad.lora)) if ad.lora else []
    with torch.no_grad():
        for name in names:
            m, p = model.get_submodule(name), ad.lora[name]
            m.lora_A.weight.copy_(p["A"])
            m.lora_B.weight.copy_(p["B"])
            if "m" in p:
                m.lora_magnitude_vector.copy_(p["m"])
        for key, t in ad.saved.items():
            mod, _, pname = key.rpartition(".")
            old = getattr(model.get_submodule(mod), pname)  # a fresh Parameter: tied weights are untied
            setattr(model.get_submodule(mod), pname, torch.nn.Parameter(t.to(old), requires_grad=False))
    for p in model.parameters():
        p.requires_grad_(False)
    return names


def attach_adapter(model: torch.nn.Module, base_path: str | Path, adapter_path: str | Path, *,
                   verify: bool = True) -> Adapter:
    """`--adapter DIR` of sample and perplexity: check the adapter against the base it is put on, then apply it."""
    ad = read_adapter(adapter_path, verify=verify)
    if ad.base.get("sha256"):
        base = read_base(base_path, verify=False)
        check_adapter(ad, base.shapes if base.shapes else model_shapes(model), base_sha256=base.sha256,
                      base_path=base.path)
    apply_adapter(model, ad)
    return ad



@dataclass
class Base:
    path: Path
    manifest: object | None          # the lm-checkpoint Manifest, None for a plain Hugging Face directory
    weight_files: list[Path]
    sha256: str                      # of the weights (one file: its sha256; shards: sha256 of their hashes)
    shapes: dict[str, tuple]         # a quantized layer's weight counts as its dense (out, in) weight
    dtypes: dict[str, torch.dtype]
    quantization: dict | None = None  # config.json's quantization_config of a gentool quantized-checkpoint

    @property
    def kind(self) -> str:
        return "quantized-checkpoint" if self.quantization else "lm-checkpoint"


def read_base(path: str | Path, *, verify: bool = True) -> Base:
    """A gentool lm-checkpoint, a quantized-checkpoint (QLoRA's base) or a Hugging Face Llama directory: its weight
    files, hash and tensor shapes."""
    import hashlib

    from gentool.artifacts import read_artifact, sha256_file
    from gentool.models.checkpoint import check_tensors, quantization_config, read_config, weight_files

    path = Path(path)
    if not path.is_dir():
        raise UsageProblem("no such checkpoint directory", path=path,
                           hint="pass an lm-checkpoint or HF Llama directory")
    qconf = quantization_config(path)
    kind = "quantized-checkpoint" if qconf else "lm-checkpoint"
    manifest = read_artifact(path, kind, verify=verify) if (path / "manifest.json").is_file() else None
    files = weight_files(path)
    if not (path / "config.json").is_file():
        raise UsageProblem("no config.json", path=path, hint="pass an lm-checkpoint or HF Llama directory")
    hashes = []
    for f in files:
        entry = manifest.files.get(f.name, {}) if manifest is not None else {}
        hashes.append(entry.get("sha256") or sha256_file(f))
    sha = hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()
    shapes, dtypes = {}, {}
    for f in files:
        for k, info in read_header(f).items():
            shapes[k] = tuple(info["shape"])
            dtypes[k] = _DTYPES.get(info["dtype"], torch.float32)
    if qconf:
        _dense_shapes(qconf, shapes, dtypes, path)
    check_tensors(read_config(path), shapes, path)  # the config and tensor set every LM reader checks
    return Base(path, manifest, files, sha, shapes, dtypes, qconf)


def _dense_shapes(qconf: dict, shapes: dict, dtypes: dict, where: Path) -> None:
    """Replace a quantized layer's codes and companions by its dense `.weight` shape (int4/NF4 pack two codes per
    byte along the input dimension)."""
    from gentool.models.quant import COMPANIONS, stored_schemes

    for name, scheme in stored_schemes(qconf, list(shapes), where).items():
        if f"{name}.weight" not in shapes:
            raise GentoolError(f"missing tensor {name}.weight", path=where, hint="the checkpoint is corrupt")
        out_f, cols = shapes[f"{name}.weight"]
        for c in COMPANIONS[scheme]:
            shapes.pop(f"{name}.{c}", None)
            dtypes.pop(f"{name}.{c}", None)
        shapes[f"{name}.weight"] = (out_f, cols * 2 if scheme in ("int4", "nf4") else cols)
        dtypes[f"{name}.weight"] = torch.float32


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
