"""The optimizers (AdamW; Muon on hidden matrices with AdamW on the rest) and the device peaks MFU is measured
against."""

from __future__ import annotations

import torch

from gentool.errors import UsageProblem
from gentool.train.schedules import lr_at  # noqa: F401  (re-exported)

OPTIMIZERS = ("adamw", "muon", "normuon")
HEADS = ("lm_head", "head", "output")     # output projections by module name: AdamW, as the embeddings


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of trainable parameters, tied ones once (named by their first name)."""
    seen: set[int] = set()
    return [(n, p) for n, p in model.named_parameters(remove_duplicate=False)
            if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(hidden matrices for Muon, the rest for AdamW). The rest: embeddings (and weights tied to them), output
    heads (a module named lm_head/head/output), norms and biases. A hidden weight of more than two dimensions (a
    convolution) is refused by name: Muon orthogonalises matrices."""
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    muon, rest = [], []
    for name, p in _trainable(model):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if p.ndim < 2 or id(p) in embeds or module.rsplit(".", 1)[-1] in HEADS:
            rest.append(p)
        elif p.ndim > 2:
            raise UsageProblem(f"Muon cannot train parameter {name} of shape {tuple(p.shape)}: it orthogonalises "
                               "2-D matrices", hint="use --optimizer adamw")
        else:
            muon.append(p)
    if not muon:
        raise UsageProblem("Muon has no hidden matrix to train (only embeddings, heads, norms or biases are "
                           "trainable)", hint="use --optimizer adamw")
    return muon, rest


EMBED_LR, HEAD_LR = 3e-2, 1e-2   # Muon's companions: AdamW on the embeddings and the output head (see build_optimizer)


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    device: str = "cpu", optimizer: str = "adamw", muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, embed_lr: float | None = None,
                    head_lr: float | None = None) -> torch.optim.Optimizer:
    """Weight decay on >= 2-D trainable tensors (matrices, embeddings); none on norms and biases; frozen
    parameters (LoRA's base) get no optimizer state at all. Fused AdamW kernels on CUDA.

    muon / normuon: the hidden matrices (see `muon_split`) take Muon steps at `muon_lr` (Newton-Schulz; normuon:
    Polar Express + NorMuon); the embeddings (and a head tied to them) AdamW at `embed_lr` (default EMBED_LR), an
    untied output head AdamW at `head_lr` (default HEAD_LR), norms and biases AdamW at `lr`. Separate rates as
    nanochat and modded-nanogpt have them: with Muon's matrices at 0.02 the embeddings and head left at an AdamW
    rate of 1e-3 hold the model back (bench/train_optim.py --grid measures the defaults). Every matrix shrinks by
    the same lr·weight_decay per step, whatever its own rate. Each group's `lr_scale` is its learning rate
    relative to `lr`: the loop multiplies the schedule by it."""
    fused = str(device).startswith("cuda")
    if optimizer not in OPTIMIZERS:
        raise UsageProblem(f"unknown --optimizer {optimizer!r}", hint="choose " + ", ".join(OPTIMIZERS))
    if optimizer == "adamw":
        unique = [p for _, p in _trainable(model)]
        decay = [p for p in unique if p.dim() >= 2]
        no_decay = [p for p in unique if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)
    from gentool.train.muon import MuonAdamW

    embed_lr = EMBED_LR if embed_lr is None else embed_lr
    head_lr = HEAD_LR if head_lr is None else head_lr
    for flag, value in (("--muon-lr", muon_lr), ("--embed-lr", embed_lr), ("--head-lr", head_lr)):
        if not value > 0:
            raise UsageProblem(f"{flag} {value} is out of range", hint="a positive learning rate")
    if not 0 <= muon_momentum < 1:
        raise UsageProblem(f"--muon-momentum {muon_momentum} is out of range", hint="a momentum in [0, 1)")
    muon, rest = muon_split(model)
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}

    def group(params: list[torch.nn.Parameter], group_lr: float, **kw) -> dict:
        scale = group_lr / lr
        return {"params": params, "lr": group_lr, "lr_scale": scale, "weight_decay": weight_decay / scale, **kw}

    groups = [group(muon, muon_lr, muon=True),
              group([p for p in rest if id(p) in embeds], embed_lr),
              group([p for p in rest if p.dim() >= 2 and id(p) not in embeds], head_lr),
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    return MuonAdamW(groups, lr=lr, betas=betas, momentum=muon_momentum, fused=fused,
                     variant="normuon" if optimizer == "normuon" else "newton-schulz")


def device_peak_flops(device: str) -> float | None:
    """Dense bf16 peak of known accelerators, for MFU (None where unknown, e.g. CPUs)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, peak in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("L40", 181e12),
                      ("4090", 165e12)):
        if key in name:
            return peak
    return None
