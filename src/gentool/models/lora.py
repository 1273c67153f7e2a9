"""LoRA layers applied from outside the model: y = W x + s·B A x (Hu et al. 2021), rsLoRA, DoRA.

`inject_lora(model, cfg)` swaps the targeted linear layers for `LoRALinear` wrappers (the model file knows nothing
about LoRA), `merge_lora(model)` folds them back into plain layers. Target, rank and alpha matching follow PEFT, so
an adapter config means the same here and in `peft`:
  - target_modules as a list: a module matches when its name equals an entry or ends with "." + entry;
    as a string: a regex that must match the whole name; "all-linear": every linear layer except the output head.
  - rank_pattern / alpha_pattern: the first key k for which `(.*\\.)?(k)$` matches the module name wins.
  - modules_to_save: whole modules trained and saved in full (their parameters are cloned, so the base stays intact
    and tied weights are untied).
Scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).
DoRA (Liu et al. 2024): W' = m ⊙ (W + s·B A) / ‖W + s·B A‖, the norm taken per output row, as PEFT computes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_HEAD = "lm_head"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | None = None

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_key(patterns: dict, name: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern matching a suffix (at a dot boundary) of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def rank_alpha(cfg: LoRAConfig, name: str) -> tuple[int, float]:
    rk, ak = pattern_key(cfg.rank_pattern, name), pattern_key(cfg.alpha_pattern, name)
    return (cfg.rank_pattern[rk] if rk is not None else cfg.r,
            cfg.alpha_pattern[ak] if ak is not None else cfg.alpha)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a quantized linear layer (anything with in/out_features and a dense weight on demand)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")
                                             and hasattr(module, "dequantize"))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear or quantized linear layer."""
    return module.weight if isinstance(module, nn.Linear) else module.dequantize()


def _layer_index(name: str) -> int | None:
    m = re.match(r".*?\.[^.]*\.(\d+)\.", name)  # PEFT: the first numbered segment, e.g. model.layers.3.mlp
    return int(m.group(1)) if m else None


def in_modules_to_save(cfg: LoRAConfig, name: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in cfg.modules_to_save)


def is_target(cfg: LoRAConfig, name: str, module: nn.Module) -> bool:
    """PEFT's check_target_module_exists, for the options gentool supports."""
    if in_modules_to_save(cfg, name):
        return False
    t = cfg.target_modules
    if t == "all-linear":
        found = is_linear(module) and name.split(".")[-1] != OUTPUT_HEAD
    elif isinstance(t, str):
        found = re.fullmatch(t, name) is not None
    else:
        found = name in t or any(name.endswith("." + k) for k in t)
    if found and cfg.layers_to_transform is not None:
        found = _layer_index(name) in cfg.layers_to_transform
    return found


class LoRALinear(nn.Module):
    """A frozen linear layer (`base_layer`, maybe quantized) plus a trainable low-rank update s·B A."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False):
        super().__init__()
        assert r > 0, "LoRA rank must be positive"
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = dense_weight(base_layer)
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and the reference implementation
        nn.init.zeros_(self.lora_B.weight)  # B = 0: at step 0 the layer is exactly the base layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        if dora:  # m starts at the row norms of W, so step 0 is again the base layer
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(w.float(), dim=1).to(dtype))

    @property
    def weight(self) -> torch.Tensor:
        return dense_weight(self.base_layer)

    def delta(self) -> torch.Tensor:
        """s·B A in float32, shape (out, in)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def merged_weight(self) -> torch.Tensor:
        """W + s·B A (or the DoRA weight) in float32."""
        w = dense_weight(self.base_layer).float()
        merged = w + self.delta()
        if self.lora_magnitude_vector is not None:
            merged = merged * (self.lora_magnitude_vector.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
        return merged

    disabled = False  # adapters_disabled(): the base layer alone (a preference loss's reference model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        a_dtype = self.lora_A.weight.dtype
        xd = self.lora_dropout(x).to(a_dtype)
        lora = self.lora_B(self.lora_A(xd))  # (..., out)
        if self.lora_magnitude_vector is None:
            return y + (lora * self.scaling).to(y.dtype)
        # DoRA as PEFT computes it: the norm is detached (paper, sec. 4.3), and with dropout the rescaled base
        # term uses the dropped-out input.
        w = dense_weight(self.base_layer).to(a_dtype)
        norm = torch.linalg.norm(w + self.scaling * (self.lora_B.weight @ self.lora_A.weight).detach(), dim=1)
        mscale = (self.lora_magnitude_vector / norm.detach()).to(a_dtype)  # (out,)
        base_d = F.linear(xd, w) if not isinstance(self.lora_dropout, nn.Identity) else \
            (y - self.base_layer.bias if getattr(self.base_layer, "bias", None) is not None else y).to(a_dtype)
        return y + ((mscale - 1) * base_d + mscale * lora * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{dora}"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its frozen base: every LoRA layer returns its base layer's output."""
    layers = [m for _, m in lora_modules(model)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def inject_lora(model: nn.Module, cfg: LoRAConfig, *, only: set[str] | None = None) -> list[str]:
    """Freeze `model` and wrap its target linear layers; returns the wrapped module names.

    `only` restricts wrapping to these module names (loading an adapter file wraps exactly what it holds).
    Raises ValueError naming the problem when a target matches nothing or matches a non-linear module.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALinear) or name.split(".")[-1] in ("base_layer", "lora_A", "lora_B"):
            continue
        if (name in only) if only is not None else is_target(cfg, name, module):
            if not is_linear(module):
                if only is None and isinstance(cfg.target_modules, list):
                    raise ValueError(f"LoRA target {name} is a {type(module).__name__}, not a linear layer")
                continue
            targets.append(name)
    if not targets:
        raise ValueError(f"LoRA target modules {cfg.target_modules} match no linear layer of the model")
    for name in targets:
        r, alpha = rank_alpha(cfg, name)
        _set_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout=cfg.dropout,
                                            rslora=cfg.use_rslora, dora=cfg.use_dora))
    saved = saved_module_names(model, cfg)
    missing = [m for m in cfg.modules_to_save if not any(n == m or n.endswith("." + m) for n in saved)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model")
    for name in saved:
        module = model.get_submodule(name)
        for pname, p in list(module.named_parameters(recurse=False)):
            # A fresh copy: training it leaves the base tensor (and anything tied to it) untouched.
            setattr(module, pname, nn.Parameter(p.detach().clone(), requires_grad=True))
    return targets


def saved_module_names(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    return [n for n, _ in model.named_modules() if n and in_modules_to_save(cfg, n)
            and not in_modules_to_save(cfg, n.rpartition(".")[0])]


def adapter_state_dict(model: nn.Module, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The trainable tensors under the model's own names (PEFT adds the prefix `base_model.model.`)."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
        if m.lora_magnitude_vector is not None:
            out[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    for name in saved_module_names(model, cfg):
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            out[f"{name}.{pname}"] = p
    return {k: v.detach() for k, v in out.items()}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base tensors under their original (HF) names, i.e. without the `base_layer.` infix."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k or k.endswith(".lora_magnitude_vector"):
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (computed in float32)."""
    for name, m in list(lora_modules(model)):
        base = m.base_layer
        w = dense_weight(base)
        dtype = w.dtype if w.dtype.is_floating_point else m.lora_A.weight.dtype
        bias = getattr(base, "bias", None)
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(m.merged_weight().to(dtype))
        if bias is not None:
            lin.bias.copy_(bias)
        _set_module(model, name, lin)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
