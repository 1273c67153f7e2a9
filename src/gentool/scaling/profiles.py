"""The least-squares forms as profile-likelihood problems (intervals.py): their residuals in the fit's own
parametrisation, and, for every reported quantity (parameters, derived values, predictions), how to pin it to a
value by solving for one parameter."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.special import expit

from gentool.scaling import laws
from gentool.scaling.fit import Fit
from gentool.scaling.intervals import Interval, LSProblem, Quantity, param_quantity, profile_interval


def _with(th: np.ndarray, j: int, v: float) -> np.ndarray:
    th = th.copy()
    th[j] = v
    return th


def power_problem(fit: Fit, x: np.ndarray, y: np.ndarray) -> tuple[LSProblem, Callable]:
    """Relative residuals in (log a', b, c), a' = a s^b with s the geometric mean of x (as fit_power)."""
    p = fit.params
    s = float(np.exp(np.mean(np.log(x))))
    u, ls = x / s, math.log(s)
    th = np.array([math.log(p["a"]) + p["b"] * ls, p["b"], p["c"]])
    lo_b, hi_b = laws.POWER_B_RANGE
    prob = LSProblem(lambda t: (np.exp(t[0]) * u ** t[1] + t[2] - y) / y, th, np.array([-700.0, lo_b, -np.inf]),
                     np.array([700.0, hi_b, float(y.min())]))

    def quantities(at: list[float]) -> list[Quantity]:
        se = prob.wald_se()
        qs = [Quantity("a", p["a"], 0, lambda v, t: _with(t, 0, math.log(v) + t[1] * ls) if v > 0 else None,
                       p["a"] * se[0], 0.0, math.inf),
              param_quantity("b", th, 1, se[1], lo_b, hi_b), param_quantity("c", th, 2, se[2], -math.inf, y.min())]
        for i, xs in enumerate(at):
            us = xs / s
            qs.append(Quantity(f"predict{i}.y", float(np.exp(th[0]) * us ** th[1] + th[2]), 2,
                               lambda v, t, us=us: _with(t, 2, v - np.exp(t[0]) * us ** t[1]), se[2]))
        return qs

    return prob, quantities


def sigmoid_problem(fit: Fit, x: np.ndarray, y: np.ndarray) -> tuple[LSProblem, Callable]:
    """Absolute residuals in (lo, hi, k, x0) with the sign of k fixed as fitted (so lo, hi are identified)."""
    p = fit.params
    th = np.array([p["lo"], p["hi"], p["k"], p["x0"]])
    lower, upper = np.array(fit.extra["lower"]), np.array(fit.extra["upper"])
    if p["k"] >= 0:
        lower[2] = 0.0
    else:
        upper[2] = 0.0

    def model(t, xx):
        return t[0] + (t[1] - t[0]) * expit(t[2] * (xx - t[3]))

    prob = LSProblem(lambda t: model(t, x) - y, th, lower, upper)

    def quantities(at: list[float]) -> list[Quantity]:
        se = prob.wald_se()
        qs = [param_quantity(n, th, j, se[j], lower[j], upper[j]) for j, n in enumerate(("lo", "hi", "k", "x0"))]
        for i, xs in enumerate(at):
            sv = float(expit(p["k"] * (xs - p["x0"])))
            if sv < 0.5:   # pin the prediction through lo (its weight 1 - s is the larger)
                def solve(v, t, xs=xs):
                    w = expit(t[2] * (xs - t[3]))
                    return _with(t, 0, (v - t[1] * w) / (1 - w)) if 1 - w > 1e-12 else None
                j = 0
            else:
                def solve(v, t, xs=xs):
                    w = expit(t[2] * (xs - t[3]))
                    return _with(t, 1, (v - t[0] * (1 - w)) / w) if w > 1e-12 else None
                j = 1
            qs.append(Quantity(f"predict{i}.y", float(model(th, xs)), j, solve,
                               float(np.sqrt(se[0] ** 2 + se[1] ** 2)) or 1e-3, lower[0], upper[0]))
        return qs

    return prob, quantities


def profile_all(prob: LSProblem, quantities: list[Quantity], n: int) -> dict[str, Interval]:
    with np.errstate(all="ignore"):
        return {q.name: profile_interval(prob, q, n) for q in quantities}
