"""Training objectives: DDPM with eps-, v- or x0-prediction, and flow matching / rectified flow.

Every denoiser is called as model(x, t, y) with t in [0, 1] (B,) and y class ids (B,) or None, where id
`num_classes` is the null class used for classifier-free guidance.

DDPM (Ho et al. 2020): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, loss ||target - model(x_t, t)||^2 where the target
is eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022).
Flow matching (Lipman et al. 2023, conditional OT path; = rectified flow, Liu et al. 2022): t = 0 is noise and t = 1
data, x_t = t x1 + (1 - t) x0, target velocity x1 - x0. Reflow trains the same loss on (noise, sample) pairs that a
first model's ODE produced, which straightens the paths so that few Euler steps suffice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from gentool.diffusion.schedules import Schedule

PARAMETERIZATIONS = {"ddpm": ("eps", "v", "x0"), "flow-matching": ("velocity",)}


@dataclass
class DiffusionSpec:
    family: str = "ddpm"               # ddpm | flow-matching
    parameterization: str = "eps"      # eps | v | x0 | velocity
    schedule: str = "linear"           # ddpm only: linear | cosine
    timesteps: int = 1000              # ddpm only
    num_classes: int = 0               # 0: unconditional
    class_dropout: float = 0.1         # label dropout for classifier-free guidance

    def __post_init__(self):
        if self.family not in PARAMETERIZATIONS:
            raise ValueError(f"unknown family {self.family!r} (ddpm or flow-matching)")
        if self.parameterization not in PARAMETERIZATIONS[self.family]:
            raise ValueError(f"{self.family} supports parameterization {', '.join(PARAMETERIZATIONS[self.family])}, "
                             f"not {self.parameterization!r}")

    def schedule_obj(self) -> Schedule:
        return Schedule(self.schedule, self.timesteps)

    def to_dict(self) -> dict:
        return asdict(self)


def drop_labels(y: torch.Tensor | None, p: float, num_classes: int) -> torch.Tensor | None:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    if y is None or p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def to_x0_eps(out: torch.Tensor, xt: torch.Tensor, i: torch.Tensor, schedule: Schedule,
              param: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network output under any parameterization."""
    a = schedule._take(schedule.abar, i, xt)
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    if param == "eps":
        return (xt - s1 * out) / sa, out
    if param == "x0":
        return out, (xt - sa * out) / s1
    if param == "v":
        return sa * xt - s1 * out, s1 * xt + sa * out
    raise ValueError(f"unknown parameterization {param!r}")


def ddpm_target(x0: torch.Tensor, eps: torch.Tensor, i: torch.Tensor, schedule: Schedule, param: str) -> torch.Tensor:
    if param == "eps":
        return eps
    if param == "x0":
        return x0
    a = schedule._take(schedule.abar, i, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def ddpm_loss(model, x0: torch.Tensor, y: torch.Tensor | None, spec: DiffusionSpec, schedule: Schedule,
              i: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """The 'simple' loss: uniform timestep, MSE on the parameterization's target."""
    b = x0.shape[0]
    i = torch.randint(0, schedule.steps, (b,), device=x0.device) if i is None else i
    eps = torch.randn_like(x0) if eps is None else eps
    xt = schedule.q_sample(x0, i, eps)
    y = drop_labels(y, spec.class_dropout, spec.num_classes)
    out = model(xt, schedule.time_input(i), y)
    return (out.float() - ddpm_target(x0, eps, i, schedule, spec.parameterization)).pow(2).mean()


def flow_loss(model, x1: torch.Tensor, y: torch.Tensor | None, spec: DiffusionSpec, x0: torch.Tensor | None = None,
              t: torch.Tensor | None = None) -> torch.Tensor:
    """Conditional flow matching on the straight path; pass x0 (the paired noise) for reflow."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    t = torch.rand(x1.shape[0], device=x1.device) if t is None else t
    tb = t.view(-1, *([1] * (x1.dim() - 1)))
    xt = tb * x1 + (1 - tb) * x0
    y = drop_labels(y, spec.class_dropout, spec.num_classes)
    out = model(xt, t, y)
    return (out.float() - (x1 - x0)).pow(2).mean()


def loss(model, x: torch.Tensor, y: torch.Tensor | None, spec: DiffusionSpec, schedule: Schedule | None,
         noise: torch.Tensor | None = None) -> torch.Tensor:
    if spec.family == "flow-matching":
        return flow_loss(model, x, y, spec, x0=noise)
    return ddpm_loss(model, x, y, spec, schedule)
