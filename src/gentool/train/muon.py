"""Muon on the hidden matrices, AdamW on everything else, as one torch Optimizer (one state dict, so the resumable
state in train/checkpoint.py holds both).

A group with `muon=True` takes the Muon step (Keller Jordan's recipe, as torch.optim.Muon computes it):

    B ← μ·B + (1 − μ)·G                      momentum (a lerp, as torch.optim.Muon and modded-nanogpt)
    U ← G + μ·(B − G)  (Nesterov) or B
    O ← orth(U)                              ≈ the polar factor U·(UᵀU)^(−1/2), by a quintic matrix iteration
    O ← NorMuon(O)                           optional: per-neuron second-moment normalisation, Frobenius norm kept
    θ ← (1 − lr·λ)·θ − lr·√max(1, rows/cols)·O

orth is five iterations X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ, either with Keller's fixed quintic coefficients
("newton-schulz", torch's default) or with Polar Express's per-iteration coefficients (Amsel et al. 2025, the
five-step schedule with a 2% safety margin that modded-nanogpt and nanochat use). Every other group is AdamW
through torch's own functional `adam(..., decoupled_weight_decay=True)`: the same arithmetic as torch.optim.AdamW.

Under FSDP2 a parameter is a DTensor shard: the elementwise momentum stays on the shard, the orthogonalisation
needs the whole matrix, so the update is gathered, orthogonalised on every rank and cut back to the local shard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.adam import adam

NS_QUINTIC = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
VARIANTS = ("newton-schulz", "polar-express", "normuon")


def orthogonalize(g: torch.Tensor, *, method: str = "newton-schulz", steps: int = 5,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """An approximate polar factor of the matrix g (singular values pushed towards 1), computed in `dtype`
    (default bfloat16 on CUDA, float32 elsewhere); returned in g's dtype."""
    if g.ndim != 2:
        raise ValueError(f"orthogonalize takes a matrix, not a tensor of shape {tuple(g.shape)}")
    dtype = dtype or (torch.bfloat16 if g.is_cuda else torch.float32)
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    if method == "newton-schulz":
        x = x / x.norm().clamp(min=1e-7)
        coefficients = [NS_QUINTIC] * steps
    elif method in ("polar-express", "normuon"):
        x = x / (x.norm() * 1.02 + 1e-6)
        coefficients = [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]
    else:
        raise ValueError(f"unknown orthogonalisation {method!r}")
    for a, b, c in coefficients:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x.mT if tall else x).to(g.dtype)


def normuon(o: torch.Tensor, second: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025, as modded-nanogpt and nanochat apply it): divide each neuron (row, or column for a
    wide matrix; `second` has the shape of that reduction) by the root of an EMA of its mean square, then rescale to
    the orthogonalised update's Frobenius norm. Updates `second` in place."""
    dim = -1 if o.size(0) >= o.size(1) else -2
    mean_sq = o.float().square().mean(dim=dim, keepdim=True)
    second.lerp_(mean_sq.to(second.dtype), 1 - beta2)
    scale = second.float().clamp_min(1e-10).rsqrt()
    before = mean_sq.sum().sqrt()
    after = (mean_sq * scale.square()).sum().sqrt().clamp_min(1e-10)
    return o * (scale * (before / after)).to(o.dtype)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` cut to the local shard of DTensor `ref` (every rank holds the same `full`: no communication)."""
    if not hasattr(ref, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon=True` (2-D parameters only) take Muon steps; the others take AdamW steps."""

    def __init__(self, groups: list[dict[str, Any]], *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 variant: str = "newton-schulz", ns_steps: int = 5, beta2_normuon: float = 0.95,
                 fused: bool = False):
        if variant not in VARIANTS:
            raise ValueError(f"unknown Muon variant {variant!r} (choose {', '.join(VARIANTS)})")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, variant=variant, ns_steps=ns_steps, beta2_normuon=beta2_normuon,
                        muon=False, fused=fused)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon takes 2-D matrices; a parameter has shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _adamw(self, group: dict[str, Any]) -> None:
        params, grads, avgs, sqs, steps = [], [], [], [], []
        fused = bool(group["fused"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            b1, b2 = group["betas"]
            adam(params, grads, avgs, sqs, [], steps, fused=fused or None, decoupled_weight_decay=True,
                 amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"],
                 eps=group["eps"], maximize=False)

    def _muon(self, group: dict[str, Any]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g, state = p.grad, self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mu)
            update = g.lerp(buf, mu) if group["nesterov"] else buf
            o = orthogonalize(_full(update), method=group["variant"], steps=group["ns_steps"])
            if group["variant"] == "normuon":
                rows, cols = o.shape
                if "second_moment" not in state:  # full (not sharded) and small: one value per neuron
                    state["second_moment"] = torch.zeros((rows, 1) if rows >= cols else (1, cols),
                                                         dtype=torch.float32, device=o.device)
                o = normuon(o, state["second_moment"], group["beta2_normuon"])
            rows, cols = p.shape
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(_like(o, p), alpha=-lr * math.sqrt(max(1.0, rows / cols)))
