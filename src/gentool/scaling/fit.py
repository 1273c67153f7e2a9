"""The scaling-law forms, their fits, bootstrap confidence intervals and the holdout test.

- power:      L(X) = a * X^b + c          (b < 0; least squares on relative residuals, X scaled by its geometric mean)
- chinchilla: L(N, D) = E + A/N^alpha + B/D^beta, Hoffmann et al. 2022 Approach 3: Huber (delta 1e-3) on
              log L - LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e; L-BFGS from a grid
              of initialisations, keeping the best.
- isoflop:    Approach 2: per compute budget a parabola of L against log N gives N_opt; then N_opt = k C^m.
- sigmoid:    y = lo + (hi - lo) / (1 + exp(-k (x - x0))), accuracy against normalised loss (Llama 3).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import optimize
from scipy.special import logsumexp

from gentool.errors import UsageProblem

MIN_POINTS = {"power": 4, "chinchilla": 6, "isoflop": 6, "sigmoid": 5}
HUBER_DELTA = 1e-3


@dataclass
class Fit:
    form: str
    params: dict[str, float]
    loss: float
    converged: bool
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# --- power --------------------------------------------------------------------------------------------------------

def _power_fit(x: np.ndarray, y: np.ndarray, init: dict[str, float] | None = None) -> Fit:
    scale = float(np.exp(np.mean(np.log(x))))
    u = x / scale

    def resid(p):
        log_a, b, c = p
        return (np.exp(log_a) * u**b + c - y) / y

    starts = [init and [math.log(max(init["a"] * scale ** init["b"], 1e-12)), init["b"], init["c"]]] if init else []
    starts += [[math.log(max(y.max() - c0, 1e-6)), b0, c0] for b0 in (-0.05, -0.2, -0.5, -1.0)
               for c0 in (0.0, 0.5 * y.min(), 0.9 * y.min())]
    best = None
    for s in starts:
        if not s:
            continue
        r = optimize.least_squares(resid, s, bounds=([-50, -5, -np.inf], [50, -1e-6, y.min()]), method="trf")
        if best is None or r.cost < best.cost:
            best = r
    log_a, b, c = best.x
    fit = Fit("power", {"a": math.exp(log_a) * scale ** (-b), "b": b, "c": c}, float(best.cost), bool(best.success))
    if b > -1e-4 or b < -4.9:
        fit.warnings.append(f"exponent b={b:.4g} sits at the edge of its range")
    return fit


def power_predict(p: dict[str, float], x: np.ndarray) -> np.ndarray:
    return p["a"] * x ** p["b"] + p["c"]


# --- chinchilla ---------------------------------------------------------------------------------------------------

def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))
    grad = np.where(a <= delta, r, delta * np.sign(r))
    return loss, grad


def _chin_objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])
    lse = logsumexp(terms, axis=0)
    w = np.exp(terms - lse)                    # softmax weights: d lse / d term
    loss, g = _huber(lse - logl, HUBER_DELTA)
    grad = np.array([np.sum(g * w[0]), np.sum(g * w[1]), np.sum(g * w[2]),
                     np.sum(g * w[0] * -logn), np.sum(g * w[1] * -logd)])
    return float(loss.sum()), grad


def _chin_fit(n: np.ndarray, d: np.ndarray, y: np.ndarray, init: dict[str, float] | None = None) -> Fit:
    logn, logd, logl = np.log(n), np.log(d), np.log(y)
    if init is not None:
        grid = [np.array([math.log(init["A"]), math.log(init["B"]), math.log(init["E"]), init["alpha"],
                          init["beta"]])]
    else:
        grid = [np.array(g, dtype=float) for g in itertools.product(
            (0, 5, 10, 15, 20, 25), (0, 5, 10, 15, 20, 25), (-1.0, 0.0, 1.0), (0.1, 0.5, 1.0), (0.1, 0.5, 1.0))]
    bounds = [(-20, 60), (-20, 60), (-10, 10), (0.0, 3.0), (0.0, 3.0)]
    if len(grid) > 16:  # rank the grid by its objective (cheap), refine the 16 best starts with L-BFGS
        grid = sorted(grid, key=lambda g: _chin_objective(g, logn, logd, logl)[0])[:16]
    best = None
    for g in grid:
        r = optimize.minimize(_chin_objective, g, args=(logn, logd, logl), jac=True, method="L-BFGS-B",
                              bounds=bounds, options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15})
        if best is None or r.fun < best.fun:
            best = r
    a, b, e, alpha, beta = best.x
    fit = Fit("chinchilla", {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta},
              float(best.fun), bool(best.success))
    for name, v in (("alpha", alpha), ("beta", beta)):
        if v < 1e-3 or v > 3.0 - 1e-3:
            fit.warnings.append(f"exponent {name}={v:.4g} sits at the edge of its range [0, 3]")
    if not best.success:
        fit.warnings.append(f"L-BFGS did not converge: {best.message}")
    return fit


def chinchilla_predict(p: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def compute_optimal(p: dict[str, float], c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N_opt(C) = G (C/6)^a, D_opt(C) = G^-1 (C/6)^b; a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
    alpha, beta = p["alpha"], p["beta"]
    g = (alpha * p["A"] / (beta * p["B"])) ** (1 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    return g * (c / 6) ** a, (c / 6) ** b / g


# --- isoflop ------------------------------------------------------------------------------------------------------

def _isoflop_fit(n: np.ndarray, c: np.ndarray, y: np.ndarray, init=None) -> Fit:
    order = np.argsort(c)
    groups: list[list[int]] = []
    for i in order:  # budgets within 5% of each other are one isoFLOP curve
        if groups and abs(c[i] / c[groups[-1][0]] - 1) < 0.05:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    budgets, nopt, warnings = [], [], []
    for g in groups:
        if len(g) < 3:
            continue
        k2, k1, _ = np.polyfit(np.log(n[g]), y[g], 2)
        if k2 <= 0:
            warnings.append(f"isoFLOP curve at C={np.mean(c[g]):.3g} is not convex; skipped")
            continue
        budgets.append(float(np.mean(c[g])))
        nopt.append(float(np.exp(-k1 / (2 * k2))))
    if len(budgets) < 2:
        raise UsageProblem("isoflop needs at least 2 compute budgets with 3 or more model sizes each",
                           hint="add runs, or use --form chinchilla")
    m, logk = np.polyfit(np.log(budgets), np.log(nopt), 1)
    resid = np.log(nopt) - (logk + m * np.log(budgets))
    fit = Fit("isoflop", {"k": math.exp(logk), "m": m}, float((resid**2).sum()), True, warnings,
              {"budgets": budgets, "n_opt": nopt})
    return fit


# --- sigmoid ------------------------------------------------------------------------------------------------------

def _sigmoid(x, lo, hi, k, x0):
    return lo + (hi - lo) / (1 + np.exp(-k * (x - x0)))


def _sigmoid_fit(x: np.ndarray, y: np.ndarray, init=None) -> Fit:
    p0 = [init[k] for k in ("lo", "hi", "k", "x0")] if init else [y.min(), y.max(), -5.0, float(np.median(x))]
    try:
        popt, _ = optimize.curve_fit(_sigmoid, x, y, p0=p0, maxfev=20000)
        ok = True
    except RuntimeError:
        popt, ok = np.array(p0), False
    loss = float(((_sigmoid(x, *popt) - y) ** 2).sum())
    fit = Fit("sigmoid", dict(zip(("lo", "hi", "k", "x0"), map(float, popt))), loss, ok)
    if not ok:
        fit.warnings.append("the sigmoid fit did not converge")
    return fit


# --- driver -------------------------------------------------------------------------------------------------------

def fit_form(form: str, cols: dict[str, np.ndarray], init: dict[str, float] | None = None) -> Fit:
    if form == "power":
        return _power_fit(cols["x"], cols["y"], init)
    if form == "chinchilla":
        return _chin_fit(cols["n"], cols["d"], cols["y"], init)
    if form == "isoflop":
        return _isoflop_fit(cols["n"], cols["c"], cols["y"])
    if form == "sigmoid":
        return _sigmoid_fit(cols["x"], cols["y"], init)
    raise UsageProblem(f"unknown --form {form!r}", hint="use power, chinchilla, isoflop or sigmoid")


def predict(fit: Fit, cols: dict[str, np.ndarray]) -> np.ndarray:
    p = fit.params
    if fit.form == "power":
        return power_predict(p, cols["x"])
    if fit.form == "chinchilla":
        return chinchilla_predict(p, cols["n"], cols["d"])
    if fit.form == "sigmoid":
        return _sigmoid(cols["x"], p["lo"], p["hi"], p["k"], p["x0"])
    return p["k"] * cols["c"] ** p["m"]  # isoflop: N_opt at compute C


def bootstrap(form: str, cols: dict[str, np.ndarray], runs: np.ndarray, fit: Fit, k: int, seed: int,
              derive: Callable[[Fit], dict[str, float]]) -> dict[str, list[float]]:
    """95% percentile intervals of every parameter and derived quantity, resampling whole runs."""
    rng = np.random.default_rng(seed)
    ids = np.unique(runs)
    draws: dict[str, list[float]] = {}
    for _ in range(k):
        pick = rng.choice(ids, size=len(ids), replace=True)
        idx = np.concatenate([np.flatnonzero(runs == r) for r in pick])
        sub = {c: v[idx] for c, v in cols.items()}
        try:
            f = fit_form(form, sub, init=fit.params if form != "isoflop" else None)
        except (UsageProblem, ValueError, np.linalg.LinAlgError):
            continue
        for name, v in {**f.params, **derive(f)}.items():
            draws.setdefault(name, []).append(v)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in draws.items()
            if len(v) >= max(10, k // 2)}
