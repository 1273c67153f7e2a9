"""Samplers. DDPM family: ancestral (Ho et al. 2020), DDIM with eta (Song et al. 2021), Euler and Heun on the
probability-flow ODE in Karras et al. (2022) coordinates, DPM-Solver++(2M) (Lu et al. 2022). Flow matching: Euler,
Heun and midpoint on dx/dt = v(x, t), t from 0 (noise) to 1 (data).

All DDPM-family samplers walk a decreasing subsequence of the training timesteps and end with a step to the clean
signal (abar = 1). NFE counts denoiser evaluations (classifier-free guidance runs each on a doubled batch).
In Karras coordinates y = x / sqrt(abar), sigma = sqrt((1 - abar) / abar) the ODE is dy/dsigma = eps_hat, so
Euler there is exactly DDIM with eta = 0 (Karras et al. sec. 4); Heun adds a trapezoidal correction.
"""

from __future__ import annotations

import torch

from gentool.diffusion.objectives import DiffusionSpec, to_x0_eps
from gentool.diffusion.schedules import Schedule

DDPM_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm++2m")
FLOW_SAMPLERS = ("euler", "heun", "midpoint")
ALIASES = {"dpmpp-2m": "dpm++2m", "dpm-solver++": "dpm++2m", "dpmpp2m": "dpm++2m", "ancestral": "ddpm"}


def guided(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guidance: float,
           num_classes: int) -> torch.Tensor:
    """Classifier-free guidance: u + w (c - u) with u the null-class output, one forward on a doubled batch."""
    if y is None or num_classes == 0 or guidance == 1.0:
        return model(x, t, y).float()
    null = torch.full_like(y, num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()
    cond, uncond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def timesteps(total: int, steps: int) -> list[int]:
    """`steps` evenly spaced training indices T-1, T-1-T/steps, ... ('trailing' spacing, Lin et al. 2024: the first
    step starts at pure noise; all T indices when steps = T)."""
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be between 1 and {total}, not {steps}")
    seq = [round(total - k * total / steps) - 1 for k in range(steps)]
    return sorted(set(seq), reverse=True)


def ddpm_family_sample(model, noise: torch.Tensor, y: torch.Tensor | None, spec: DiffusionSpec, *,
                       method: str = "ddim", steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
                       clip: bool = False, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    method = ALIASES.get(method, method)
    if method not in DDPM_SAMPLERS:
        raise ValueError(f"unknown sampler {method!r} for a DDPM model ({', '.join(DDPM_SAMPLERS)})")
    sch: Schedule = spec.schedule_obj()
    seq = timesteps(sch.steps, steps)
    abar = sch.abar.tolist()
    x = noise.float()
    nfe = 0

    def denoise(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal nfe
        nfe += 1
        ii = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = guided(model, x, sch.time_input(ii), y, guidance, spec.num_classes)
        x0, eps = to_x0_eps(out, x, ii, sch, spec.parameterization)
        if clip and method not in ("euler", "heun"):
            x0 = x0.clamp(-1, 1)
            eps = (x - abar[i] ** 0.5 * x0) / (1 - abar[i]) ** 0.5
        return x0, eps

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    prev_x0, prev_h = None, None
    for k, i in enumerate(seq):
        j = seq[k + 1] if k + 1 < len(seq) else -1
        a_i, a_j = abar[i], (abar[j] if j >= 0 else 1.0)
        if method in ("ddpm", "ddim"):
            x0, eps = denoise(x, i)
            if method == "ddpm":  # ancestral step with the (respaced) posterior q(x_j | x_i, x0)
                beta = 1 - a_i / a_j
                mean = (a_j ** 0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - a_j) * x) / (1 - a_i)
                std = ((1 - a_j) / (1 - a_i) * beta) ** 0.5
                x = mean + std * randn_like(x) if j >= 0 else mean
            else:
                sigma = eta * ((1 - a_j) / (1 - a_i) * (1 - a_i / a_j)) ** 0.5 if j >= 0 else 0.0
                x = a_j ** 0.5 * x0 + max(1 - a_j - sigma ** 2, 0.0) ** 0.5 * eps
                if sigma > 0:
                    x = x + sigma * randn_like(x)
        elif method in ("euler", "heun"):
            s_i, s_j = ((1 - a_i) / a_i) ** 0.5, ((1 - a_j) / a_j) ** 0.5
            _, d_i = denoise(x, i)
            y_i = x / a_i ** 0.5
            y_j = y_i + (s_j - s_i) * d_i
            if method == "heun" and j >= 0 and s_i <= 80:  # sigma_max 80 as Karras et al.: above it the
                # trapezoid spans a huge sigma interval and amplifies eps errors (cosine: sigma_T ~ 1e4), while
                # Euler is already accurate there
                _, d_j = denoise(a_j ** 0.5 * y_j, j)
                y_j = y_i + (s_j - s_i) * 0.5 * (d_i + d_j)
            x = a_j ** 0.5 * y_j
        else:  # DPM-Solver++(2M) in log-SNR lambda = log(alpha / sigma), data prediction
            x0, _ = denoise(x, i)
            if j < 0:
                x = x0
                break
            al_i, sg_i, al_j, sg_j = a_i ** 0.5, (1 - a_i) ** 0.5, a_j ** 0.5, (1 - a_j) ** 0.5
            lam_i, lam_j = torch.tensor(al_i / sg_i).log(), torch.tensor(al_j / sg_j).log()
            h = float(lam_j - lam_i)
            d = x0
            if prev_x0 is not None:
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
            x = (sg_j / sg_i) * x - al_j * (torch.expm1(torch.tensor(-h)).item()) * d
            prev_x0, prev_h = x0, h
    return x, nfe


def flow_sample(model, noise: torch.Tensor, y: torch.Tensor | None, *, method: str = "euler", steps: int = 50,
                guidance: float = 1.0, num_classes: int = 0, return_nfe: bool = False):
    """Integrate dx/dt = v(x, t) from t = 0 to 1 on a uniform grid."""
    if method not in FLOW_SAMPLERS:
        raise ValueError(f"unknown sampler {method!r} for a flow-matching model ({', '.join(FLOW_SAMPLERS)})")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    x = noise.float()
    b, h, nfe = x.shape[0], 1.0 / steps, 0

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return guided(model, x, torch.full((b,), t, device=x.device), y, guidance, num_classes)

    for k in range(steps):
        t = k * h
        if method == "euler":
            x = x + h * v(x, t)
        elif method == "midpoint":
            x = x + h * v(x + 0.5 * h * v(x, t), t + 0.5 * h)
        else:
            d = v(x, t)
            x = x + 0.5 * h * (d + v(x + h * d, t + h))
    return (x, nfe) if return_nfe else x


def sample(model, spec: DiffusionSpec, noise: torch.Tensor, y: torch.Tensor | None = None, *, sampler: str,
           steps: int, eta: float = 0.0, guidance: float = 1.0, clip: bool = False,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Samples and NFE for either family."""
    if spec.family == "flow-matching":
        return flow_sample(model, noise, y, method=ALIASES.get(sampler, sampler), steps=steps, guidance=guidance,
                           num_classes=spec.num_classes, return_nfe=True)
    return ddpm_family_sample(model, noise, y, spec, method=sampler, steps=steps, eta=eta, guidance=guidance,
                              clip=clip, generator=generator)
