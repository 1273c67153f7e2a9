"""Schedules and samplers against closed forms and an exact Gaussian-mixture denoiser."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from gentool.diffusion.objectives import DiffusionSpec, ddpm_target, to_x0_eps
from gentool.diffusion.samplers import sample, timesteps
from gentool.diffusion.schedules import Schedule
from gentool.diffusion.metrics import sliced_wasserstein

_spec = importlib.util.spec_from_file_location("_gmm", Path(__file__).with_name("_gmm.py"))
_gmm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gmm)
GMMDenoiser = _gmm.GMMDenoiser

MU = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
S = 0.3


def gmm_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MU[torch.randint(0, 3, (n,), generator=g)] + S * torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_forward_marginals_match_closed_form(kind):
    """Running the Markov chain q(x_t | x_{t-1}) step by step gives N(sqrt(abar) x0, 1 - abar)."""
    sch = Schedule(kind, 50)
    torch.manual_seed(0)
    x0 = torch.full((200_000,), 1.5, dtype=torch.float64)
    x = x0.clone()
    for i in range(50):
        x = sch.alphas[i].sqrt() * x + sch.betas[i].sqrt() * torch.randn_like(x)
        if i in (0, 9, 24, 49):
            a = sch.abar[i]
            assert x.mean().item() == pytest.approx(float(a.sqrt() * 1.5), abs=0.01)
            assert x.var().item() == pytest.approx(float(1 - a), abs=0.01)
    closed = sch.q_sample(x0, torch.full((200_000,), 49), torch.randn_like(x0))
    assert closed.mean().item() == pytest.approx(x.mean().item(), abs=0.01)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x0) from the schedule equals Gaussian conditioning of the joint (independent formula)."""
    sch = Schedule("linear", 20)
    for i in (1, 7, 19):
        a_prev, alpha = sch.abar[i - 1], sch.alphas[i]
        # prior x_{t-1} ~ N(sqrt(a_prev) x0, 1 - a_prev); likelihood x_t ~ N(sqrt(alpha) x_{t-1}, 1 - alpha)
        prec = 1 / (1 - a_prev) + alpha / (1 - alpha)
        x0, xt = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
        mean = (a_prev.sqrt() * x0 / (1 - a_prev) + alpha.sqrt() * xt / (1 - alpha)) / prec
        m, v = sch.posterior(x0, xt, torch.tensor([i]))
        assert m.item() == pytest.approx(mean.item(), rel=1e-9)
        assert v.item() == pytest.approx(1 / prec.item(), rel=1e-9)
    assert sch.post_var[0] == 0


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_parameterizations_round_trip(param):
    sch = Schedule("cosine", 100)
    x0, eps, i = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 100, (8,))
    xt = sch.q_sample(x0, i, eps)
    got_x0, got_eps = to_x0_eps(ddpm_target(x0, eps, i, sch, param), xt, i, sch, param)
    torch.testing.assert_close(got_x0, x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_eps, eps, atol=1e-3, rtol=1e-3)


def test_timesteps_spacing():
    assert timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(5, 5) == [4, 3, 2, 1, 0]


def test_ddim_eta1_full_steps_equals_ddpm_ancestral():
    """With eta = 1 and all T steps, DDIM's update has the DDPM posterior mean and variance: given the same noise
    draws the two samplers produce the same samples, hence the same distribution; and a fresh seed of each
    matches the data as well as the other."""
    spec = DiffusionSpec("ddpm", "eps", "linear", 100)
    model = GMMDenoiser(MU, S, spec.schedule_obj())
    noise = torch.randn(3000, 2, generator=torch.Generator().manual_seed(1))
    a, nfe_a = sample(model, spec, noise, sampler="ddpm", steps=100, generator=torch.Generator().manual_seed(7))
    b, nfe_b = sample(model, spec, noise, sampler="ddim", eta=1.0, steps=100,
                      generator=torch.Generator().manual_seed(7))
    assert nfe_a == nfe_b == 100
    diff = (a - b).abs()  # equal up to float32 round-off (the two formulas differ in operation order)
    assert diff.max() < 1e-2 and diff.mean() < 1e-5
    c, _ = sample(model, spec, torch.randn(3000, 2, generator=torch.Generator().manual_seed(2)), sampler="ddim",
                  eta=1.0, steps=100,
                  generator=torch.Generator().manual_seed(8))
    data, floor = gmm_data(3000, 0), sliced_wasserstein(gmm_data(3000, 1), gmm_data(3000, 2))
    assert sliced_wasserstein(a, c) < 2.5 * floor
    assert sliced_wasserstein(c, data) < 2.5 * floor
    # deterministic DDIM is a different process with the same marginals: distinct samples, same distribution
    d, _ = sample(model, spec, noise, sampler="ddim", eta=0.0, steps=100)
    assert (d - a).abs().mean() > 0.05
    assert sliced_wasserstein(d, data) < 2.5 * floor


@pytest.mark.parametrize("kind,sampler,steps", [("linear", "ddpm", 250), ("linear", "ddim", 50),
                                                ("linear", "heun", 10), ("linear", "dpm++2m", 20),
                                                ("cosine", "ddim", 50), ("cosine", "heun", 10),
                                                ("cosine", "dpm++2m", 20)])
def test_ddpm_samplers_reach_the_data(kind, sampler, steps):
    spec = DiffusionSpec("ddpm", "eps", kind, 250)
    model = GMMDenoiser(MU, S, spec.schedule_obj())
    n = 6000
    x, nfe = sample(model, spec, torch.randn(n, 2, generator=torch.Generator().manual_seed(5)), sampler=sampler,
                    steps=steps, generator=torch.Generator().manual_seed(0))
    data = gmm_data(n, 0)
    floor = max(sliced_wasserstein(gmm_data(n, k), data) for k in (1, 2))
    prior = sliced_wasserstein(torch.randn(n, 2), data)
    assert sliced_wasserstein(x, data) < min(2 * floor, prior / 5)
    if sampler != "heun":  # Heun skips its correction above sigma 80 and on the final step
        assert nfe == steps


def test_euler_is_ddim_eta0():
    spec = DiffusionSpec("ddpm", "eps", "linear", 1000)
    model = GMMDenoiser(MU, S, spec.schedule_obj())
    noise = torch.randn(500, 2)
    a, _ = sample(model, spec, noise, sampler="euler", steps=20)
    b, _ = sample(model, spec, noise, sampler="ddim", steps=20)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_flow_samplers_converge_with_their_order():
    """Against a fine midpoint solution of the exact-velocity ODE: Heun/midpoint error falls ~4x per step
    doubling (2nd order), Euler ~2x, and Euler at 50 steps reaches the data."""
    spec = DiffusionSpec("flow-matching", "velocity")
    model = GMMDenoiser(MU, S)
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    ref, _ = sample(model, spec, noise, sampler="midpoint", steps=400)

    def err(method, steps):
        return (sample(model, spec, noise, sampler=method, steps=steps)[0] - ref).norm(dim=1).mean().item()

    for method, ratio in (("euler", 1.6), ("heun", 3.0), ("midpoint", 3.0)):
        assert err(method, 20) / err(method, 40) > ratio
    assert err("heun", 20) < err("euler", 20) / 5
    n = 6000
    data = gmm_data(n, 0)
    x, nfe = sample(model, spec, torch.randn(n, 2, generator=torch.Generator().manual_seed(5)), sampler="euler",
                    steps=50)
    assert nfe == 50
    assert sliced_wasserstein(x, data) < 2 * max(sliced_wasserstein(gmm_data(n, k), data) for k in (1, 2))


def test_guidance_mixes_conditional_and_unconditional():
    from gentool.diffusion.samplers import guided

    def model(x, t, y):  # output = class id, null class = 10
        return y.float()[:, None].expand_as(x)

    out = guided(model, torch.zeros(4, 2), torch.zeros(4), torch.tensor([1, 2, 3, 4]), 3.0, 10)
    torch.testing.assert_close(out[:, 0], 10 + 3.0 * (torch.tensor([1.0, 2, 3, 4]) - 10))
    assert math.isclose(guided(model, torch.zeros(1, 2), torch.zeros(1), torch.tensor([2]), 1.0, 10)[0, 0], 2.0)
