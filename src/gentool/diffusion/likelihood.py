"""The negative ELBO of a DDPM checkpoint on held-out data, in bits per dimension (`gentool perplexity`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.diffusion.checkpoint import load_diffusion
from gentool.diffusion.nelbo import nelbo_terms
from gentool.diffusion.sample import reference_data
from gentool.errors import UsageProblem


def elbo(checkpoint: str | Path, data: str | None = None, *, split: str = "val", max_examples: int | None = None,
         t_samples: int | None = None, batch_size: int = 256, seed: int = 0, device: str = "cpu",
         verify: bool = True) -> dict[str, Any]:
    """NELBO in bits/dim: exact sum over all T terms (or `t_samples` stratified), unconditional (null class).

    8-bit images use the discretised decoder, so the figure is a bound on the bits of the 8-bit data; real-valued
    data gets a continuous density in its own units (standardisation undone), which can be negative.
    """
    ckpt = load_diffusion(checkpoint, device=device, verify=verify)
    if ckpt.spec.family != "ddpm":
        raise UsageProblem("the discrete-time ELBO needs a ddpm checkpoint; this one is flow-matching",
                           path=checkpoint, hint="score flow models with gentool sample --score")
    if split not in ("val", "train"):
        raise UsageProblem("--split must be val or train for a diffusion checkpoint")
    x, ds = reference_data(ckpt, data, split)
    if max_examples:
        x = x[:max_examples]
    levels = ckpt.data.get("levels") if ds.kind == "image" and ds.levels else None
    g = torch.Generator(device=device).manual_seed(seed)
    totals = {"prior": 0.0, "diffusion": 0.0, "decoder": 0.0}
    with console.progress("elbo", len(x)) as bar:
        for k in range(0, len(x), batch_size):
            terms = nelbo_terms(ckpt.model, ckpt.spec, x[k:k + batch_size].to(device), levels=levels,
                                t_samples=t_samples, generator=g)
            for name, v in terms.items():
                totals[name] += float(v.sum())
            bar.update(advance=min(batch_size, len(x) - k))
    dims = math.prod(ckpt.denoiser.data_shape)
    norm = ckpt.data.get("normalization")
    log_scale = float(torch.tensor(norm["std"]).log().sum()) if norm else 0.0
    per = {k: v / len(x) for k, v in totals.items()}
    to_bpd = 1 / (dims * math.log(2))
    return {"checkpoint": str(checkpoint), "examples": len(x), "dims": dims, "discrete": bool(levels),
            "t_terms": "all" if not t_samples or t_samples >= ckpt.spec.timesteps - 1 else t_samples,
            "nelbo_bpd": (sum(per.values()) + log_scale) * to_bpd, "prior_bpd": per["prior"] * to_bpd,
            "diffusion_bpd": per["diffusion"] * to_bpd, "decoder_bpd": (per["decoder"] + log_scale) * to_bpd}
