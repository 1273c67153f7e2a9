"""Fitting the laws of `laws.py`, bootstrap confidence intervals over runs, and the holdout split.

- power:      least squares on relative residuals (scipy least_squares, trust region), X scaled by its geometric
              mean, from a small grid of (b, c) starts keeping the best.
- chinchilla: Hoffmann et al. 2022 Approach 3: Huber (delta 1e-3) on log-residuals in the log-sum-exp
              parametrisation, L-BFGS-B. The paper's 4500-point grid of initialisations is ranked by its objective
              (vectorised) and L-BFGS runs from the CHIN_STARTS best; the lowest final objective wins.
- isoflop:    per budget (runs within 5% of one compute) np.polyfit of L on log N; vertex = N_opt; then log-log
              regressions of N_opt and D_opt = C / (6 N_opt) on C.
- sigmoid:    scipy curve_fit from both signs of the slope, keeping the best.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize

from gentool.errors import UsageProblem
from gentool.scaling import laws

CHIN_STARTS = 32
_BLAS_THREADS = ("openblas_{}_num_threads", "openblas_{}_num_threads64_", "scipy_openblas_{}_num_threads",
                 "scipy_openblas_{}_num_threads64_")


_blas_funcs: list | None = None


def _blas_thread_funcs() -> list:
    global _blas_funcs
    if _blas_funcs is None:
        _blas_funcs = []
        try:
            with open("/proc/self/maps") as f:
                paths = {p[-1] for p in map(str.split, f) if len(p) >= 6 and "openblas" in p[-1].lower()
                         and ".so" in p[-1]}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)
                for name in _BLAS_THREADS:
                    get, set_ = getattr(lib, name.format("get"), None), getattr(lib, name.format("set"), None)
                    if get is not None and set_ is not None:
                        _blas_funcs.append((get, set_))
        except OSError:
            pass
    return _blas_funcs


@contextlib.contextmanager
def single_threaded_blas():
    """Run OpenBLAS on one thread (as threadpoolctl would): scipy's L-BFGS-B makes thousands of tiny BLAS calls,
    and threaded OpenBLAS spins on them, 10-30x slower than one thread on a busy machine. No-op elsewhere."""
    saved = [(set_, get()) for get, set_ in _blas_thread_funcs()]
    for set_, _ in saved:
        set_(1)
    try:
        yield
    finally:
        for set_, n in saved:
            set_(n)


@dataclass
class Fit:
    form: str
    params: dict[str, float]
    loss: float                      # the optimiser's objective at the optimum
    converged: bool
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def fit_power(x: np.ndarray, y: np.ndarray, init: dict[str, float] | None = None) -> Fit:
    scale = float(np.exp(np.mean(np.log(x))))
    u = x / scale

    def resid(p):
        log_a, b, c = p
        return (np.exp(log_a) * u**b + c - y) / y

    lo_b, hi_b = laws.POWER_B_RANGE
    starts = [[math.log(max(y.max() - c0, 1e-6)), b0, c0] for b0 in (-0.05, -0.2, -0.5, -1.0)
              for c0 in (0.0, 0.5 * y.min(), 0.9 * y.min())]
    if init:
        starts = [[math.log(max(init["a"] * scale ** init["b"], 1e-300)), min(max(init["b"], lo_b), hi_b),
                   min(init["c"], y.min())]]
    best = None
    for s in starts:
        r = optimize.least_squares(resid, s, bounds=([-700, lo_b, -np.inf], [700, hi_b, y.min()]), method="trf")
        if best is None or r.cost < best.cost:
            best = r
    log_a, b, c = (float(v) for v in best.x)
    fit = Fit("power", {"a": math.exp(log_a) * scale ** (-b), "b": b, "c": c}, float(2 * best.cost),
              bool(best.success))
    if b > hi_b - 1e-4 or b < lo_b + 1e-3:
        fit.warnings.append(f"exponent b={b:.4g} sits at the edge of its range [{lo_b:g}, 0)")
    if c > y.min() - 1e-9 * abs(y.min()):
        fit.warnings.append(f"the irreducible term c={c:.4g} sits at its bound (the smallest y)")
    if not best.success:
        fit.warnings.append(f"the power fit did not converge: {best.message}")
    return fit


def fit_chinchilla(n: np.ndarray, d: np.ndarray, y: np.ndarray, init: dict[str, float] | None = None) -> Fit:
    logn, logd, logl = np.log(n), np.log(d), np.log(y)
    if init is not None:
        starts = [laws.chin_theta(init)]
    else:
        grid = np.array(list(itertools.product(*laws.CHIN_GRID)))
        score = np.concatenate([laws.chin_objective_grid(g, logn, logd, logl) for g in np.array_split(grid, 9)])
        starts = grid[np.argsort(score, kind="stable")[:CHIN_STARTS]]
    best = None
    for s in starts:
        r = optimize.minimize(laws.chin_objective, s, args=(logn, logd, logl), jac=True, method="L-BFGS-B",
                              bounds=laws.CHIN_BOUNDS, options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-15})
        if best is None or r.fun < best.fun:
            best = r
    p = laws.chin_params(best.x)
    fit = Fit("chinchilla", p, float(best.fun), bool(best.success))
    for name in ("alpha", "beta"):
        if p[name] < 1e-3 or p[name] > laws.CHIN_BOUNDS[3][1] - 1e-3:
            fit.warnings.append(f"exponent {name}={p[name]:.4g} sits at the edge of its range [0, 3]")
    for name, i in (("A", 0), ("B", 1), ("E", 2)):
        if min(abs(best.x[i] - lim) for lim in laws.CHIN_BOUNDS[i]) < 1e-3:
            fit.warnings.append(f"log {name}={best.x[i]:.4g} sits at the edge of its range {laws.CHIN_BOUNDS[i]}")
    if not best.success:
        fit.warnings.append(f"L-BFGS did not converge: {best.message}")
    return fit


def budgets(c: np.ndarray, tol: float = 0.05) -> list[list[int]]:
    """Indices grouped into isoFLOP curves: sorted compute, consecutive values within `tol` of the group's first."""
    groups: list[list[int]] = []
    for i in np.argsort(c, kind="stable"):
        if groups and abs(c[i] / c[groups[-1][0]] - 1) < tol:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def isoflop_vertex(n: np.ndarray, y: np.ndarray) -> float | None:
    """N at the minimum of the parabola of y in log N (None: fewer than 3 sizes, or not convex)."""
    if len(np.unique(n)) < 3:
        return None
    k2, k1, _ = np.polyfit(np.log(n), y, 2)
    return math.exp(-k1 / (2 * k2)) if k2 > 0 else None


def fit_isoflop(n: np.ndarray, c: np.ndarray, y: np.ndarray, init=None) -> Fit:
    cs, nopt, lopt, warnings = [], [], [], []
    for g in budgets(c):
        if len(np.unique(n[g])) < 3:
            continue
        ln = np.log(n[g])
        k2, k1, k0 = np.polyfit(ln, y[g], 2)
        budget = float(np.exp(np.mean(np.log(c[g]))))
        if k2 <= 0:
            warnings.append(f"the isoFLOP curve at C={budget:.3g} is not convex; skipped")
            continue
        v = -k1 / (2 * k2)
        if not ln.min() <= v <= ln.max():
            warnings.append(f"the optimum at C={budget:.3g} (N={math.exp(v):.3g}) lies outside the sampled sizes")
        cs.append(budget)
        nopt.append(math.exp(v))
        lopt.append(k0 - k1 * k1 / (4 * k2))
    if len(cs) < 2:
        raise UsageProblem(f"isoflop needs at least 2 compute budgets with 3 or more model sizes each; got {len(cs)}",
                           hint="add runs, or use --form chinchilla")
    lc, ln_opt = np.log(cs), np.log(nopt)
    ld_opt = lc - math.log(6) - ln_opt
    aN, bN = np.polyfit(lc, ln_opt, 1)
    aD, bD = np.polyfit(lc, ld_opt, 1)
    resid = ln_opt - (bN + aN * lc)
    params = {"kN": math.exp(bN), "aN": float(aN), "kD": math.exp(bD), "aD": float(aD)}
    return Fit("isoflop", params, float((resid**2).sum()), True, warnings,
               {"budgets": cs, "n_opt": nopt, "d_opt": list(np.exp(ld_opt)), "loss_opt": lopt})


def fit_sigmoid(x: np.ndarray, y: np.ndarray, init: dict[str, float] | None = None) -> Fit:
    span = float(np.ptp(x)) or 1.0
    starts = [[init[k] for k in ("lo", "hi", "k", "x0")]] if init else \
        [[y.min(), y.max(), s * 8 / span, float(np.median(x))] for s in (-1, 1)]
    best, loss = None, math.inf
    for p0 in starts:
        try:
            popt, _ = optimize.curve_fit(lambda x, lo, hi, k, x0: laws.sigmoid({"lo": lo, "hi": hi, "k": k, "x0": x0}, x),
                                         x, y, p0=p0, maxfev=20000)
        except (RuntimeError, optimize.OptimizeWarning):
            continue
        p = dict(zip(("lo", "hi", "k", "x0"), (float(v) for v in popt)))
        sse = float(((laws.sigmoid(p, x) - y) ** 2).sum())
        if sse < loss:
            best, loss = p, sse
    if best is None:
        p = dict(zip(("lo", "hi", "k", "x0"), (float(v) for v in starts[0])))
        return Fit("sigmoid", p, float(((laws.sigmoid(p, x) - y) ** 2).sum()), False,
                   ["the sigmoid fit did not converge"])
    if best["lo"] > best["hi"]:  # (lo, hi, k) and (hi, lo, -k) are one curve: report lo <= hi
        best = {"lo": best["hi"], "hi": best["lo"], "k": -best["k"], "x0": best["x0"]}
    fit = Fit("sigmoid", best, loss, True)
    if not x.min() <= best["x0"] <= x.max():
        fit.warnings.append(f"the midpoint x0={best['x0']:.4g} lies outside the data [{x.min():.4g}, {x.max():.4g}]")
    return fit


def fit_form(form: str, cols: dict[str, np.ndarray], init: dict[str, float] | None = None) -> Fit:
    with single_threaded_blas():
        return _fit_form(form, cols, init)


def _fit_form(form: str, cols: dict[str, np.ndarray], init: dict[str, float] | None = None) -> Fit:
    if form == "power":
        return fit_power(cols["x"], cols["y"], init)
    if form == "chinchilla":
        return fit_chinchilla(cols["n"], cols["d"], cols["y"], init)
    if form == "isoflop":
        return fit_isoflop(cols["n"], cols["c"], cols["y"])
    if form == "sigmoid":
        return fit_sigmoid(cols["x"], cols["y"], init)
    raise UsageProblem(f"unknown --form {form!r}", hint="use " + ", ".join(laws.FORMS))


def bootstrap(form: str, cols: dict[str, np.ndarray], runs: np.ndarray, fit: Fit, k: int, seed: int,
              derive: Callable[[Fit], dict[str, float]]) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Resample whole runs with replacement k times (seeded) and refit from the full fit's optimum.

    Returns 95% percentile intervals of every parameter and derived quantity, and the refitted parameter sets
    (for bands in the plot). A quantity whose refits failed more than half of the time gets no interval."""
    rng = np.random.default_rng(seed)
    ids = np.array(list(dict.fromkeys(runs)))   # in the caller's (canonical) order, not sorted by name
    members = {r: np.flatnonzero(runs == r) for r in ids}
    draws: dict[str, list[float]] = {}
    fits: list[dict[str, float]] = []
    for _ in range(k):
        idx = np.concatenate([members[r] for r in rng.choice(ids, size=len(ids), replace=True)])
        try:
            f = fit_form(form, {c: v[idx] for c, v in cols.items()}, init=fit.params)
        except (UsageProblem, ValueError, np.linalg.LinAlgError):
            continue
        fits.append(f.params)
        for name, v in {**f.params, **derive(f)}.items():
            if math.isfinite(v):
                draws.setdefault(name, []).append(v)
    ci = {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in draws.items()
          if len(v) >= max(2, k // 2)}
    return ci, fits


def largest_runs(runs: np.ndarray, size: np.ndarray, k: int) -> list[str]:
    """The k runs with the largest size (compute, or X); a run's size is its largest point's."""
    run_size = {str(r): float(size[runs == r].max()) for r in np.unique(runs)}
    return sorted(run_size, key=lambda r: (-run_size[r], r))[:k]


def holdout_errors(runs: np.ndarray, actual: np.ndarray, predicted: np.ndarray) -> list[dict[str, Any]]:
    return [{"run": str(r), "predicted": float(p), "actual": float(a), "abs_err": float(abs(p - a)),
             "rel_err": float(abs(p - a) / abs(a)) if a else math.inf}
            for r, a, p in zip(runs, actual, predicted)]


def holdout_summary(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean and max relative error of the held-out predictions, and their bias: the mean of (predicted - actual) /
    actual (positive: the law predicts too high)."""
    rows = [r for r in rows if r["actual"]]
    if not rows:
        return None
    rel = np.array([r["rel_err"] for r in rows])
    signed = np.array([(r["predicted"] - r["actual"]) / abs(r["actual"]) for r in rows])
    return {"n": len(rows), "mean_rel_err": float(rel.mean()), "max_rel_err": float(rel.max()),
            "bias": float(signed.mean())}
