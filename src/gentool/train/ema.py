"""Exponential moving average of the weights (diffusion samples from the EMA copy)."""

from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` to average into (same device and dtype)."""
    return copy.deepcopy(model).requires_grad_(False).eval()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, for parameters; buffers are copied."""
    e_params, m_params = list(ema.parameters()), list(model.parameters())
    if len(e_params) != len(m_params):
        raise ValueError("the EMA copy does not match the model")
    torch._foreach_lerp_(e_params, [p.detach().to(e.dtype) for e, p in zip(e_params, m_params)], 1 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)
