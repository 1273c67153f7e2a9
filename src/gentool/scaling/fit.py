"""Fitting the laws of `laws.py`, bootstrap confidence intervals over runs, and the holdout split.

- power:      least squares on relative residuals (scipy least_squares, trust region), X scaled by its geometric
              mean, from a small grid of (b, c) starts keeping the best.
- chinchilla: Hoffmann et al. 2022 Approach 3: Huber (delta 1e-3) on log-residuals in the log-sum-exp
              parametrisation, L-BFGS-B. The paper's 4500-point grid of initialisations is ranked by its objective
              (vectorised) and L-BFGS runs from the CHIN_STARTS best; the lowest final objective wins.
- isoflop:    per budget (runs within 5% of one compute) np.polyfit of L on log N; vertex = N_opt; then log-log
              regressions of N_opt and D_opt = C / (6 N_opt) on C.
- sigmoid:    bounded least squares (scipy least_squares) from both signs of the slope, keeping the best.

Whether a fit converged is judged by converge.py (the objective's change when the optimiser restarts from its answer),
never by the optimiser's status flag, which differs between CPUs at machine precision.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize

from gentool.errors import UsageProblem
from gentool.scaling import laws
from gentool.scaling.converge import polish

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


def _floor(n: int, scale: float = 1.0) -> float:
    """The rounding level of a sum of n squared residuals of size `scale` (relative residuals: 1)."""
    return n * (1e-12 * scale) ** 2


_TIGHT = {"ftol": 1e-14, "xtol": 1e-14, "gtol": 1e-14}   # least_squares restarts: stop on rounding, not on 1e-8


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
    def restart(x0):
        r = optimize.least_squares(resid, x0, bounds=([-700, lo_b, -np.inf], [700, hi_b, y.min()]), method="trf",
                                   **_TIGHT)
        return r.x, float(2 * r.cost)

    theta, loss, converged, drop = polish(restart, best.x, float(2 * best.cost), len(y), 3, _floor(len(y)))
    log_a, b, c = (float(v) for v in theta)
    fit = Fit("power", {"a": math.exp(log_a) * scale ** (-b), "b": b, "c": c}, loss, converged)
    if b > hi_b - 1e-4 or b < lo_b + 1e-3:
        fit.warnings.append(f"exponent b={b:.4g} sits at the edge of its range [{lo_b:g}, 0)")
    if c > y.min() - 1e-9 * abs(y.min()):
        fit.warnings.append(f"the irreducible term c={c:.4g} sits at its bound (the smallest y)")
    if not converged:
        fit.warnings.append(f"the power fit did not converge (a restart still lowered its objective by {drop:.3g})")
    return fit


def fit_chinchilla(n: np.ndarray, d: np.ndarray, y: np.ndarray, init: dict[str, float] | None = None) -> Fit:
    logn, logd, logl = np.log(n), np.log(d), np.log(y)
    if init is not None:
        starts = [laws.chin_theta(init)]
    else:
        grid = np.array(list(itertools.product(*laws.CHIN_GRID)))
        score = np.concatenate([laws.chin_objective_grid(g, logn, logd, logl) for g in np.array_split(grid, 9)])
        starts = grid[np.argsort(score, kind="stable")[:CHIN_STARTS]]

    def run(x0):
        r = optimize.minimize(laws.chin_objective, x0, args=(logn, logd, logl), jac=True, method="L-BFGS-B",
                              bounds=laws.CHIN_BOUNDS, options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-15})
        return r.x, float(r.fun)

    best = None
    for s in starts:
        x, f = run(s)
        if best is None or f < best[1]:
            best = (x, f)
    theta, loss, converged, drop = polish(run, best[0], best[1], len(y), 5, _floor(len(y)))
    p = laws.chin_params(theta)
    fit = Fit("chinchilla", p, loss, converged)
    for name in ("alpha", "beta"):
        if p[name] < 1e-3 or p[name] > laws.CHIN_BOUNDS[3][1] - 1e-3:
            fit.warnings.append(f"exponent {name}={p[name]:.4g} sits at the edge of its range [0, 3]")
    for name, i in (("A", 0), ("B", 1), ("E", 2)):
        if min(abs(theta[i] - lim) for lim in laws.CHIN_BOUNDS[i]) < 1e-3:
            fit.warnings.append(f"log {name}={theta[i]:.4g} sits at the edge of its range {laws.CHIN_BOUNDS[i]}")
    if not converged:
        fit.warnings.append(f"L-BFGS did not converge (a restart still lowered its objective by {drop:.3g})")
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


def sigmoid_bounds(y: np.ndarray, bounds: tuple[float, float] | None) -> tuple[float, float]:
    """The floor and ceiling of a sigmoid's asymptotes: as given, else [0, 1] when every y lies in it (accuracy),
    else unbounded."""
    if bounds is not None:
        lo, hi = bounds
        if not lo < hi:
            raise UsageProblem(f"--bounds {lo:g},{hi:g}: the floor must be below the ceiling")
        return float(lo), float(hi)
    if y.min() >= 0 and y.max() <= 1:
        return 0.0, 1.0
    return -math.inf, math.inf


def fit_sigmoid(x: np.ndarray, y: np.ndarray, init: dict[str, float] | None = None,
                bounds: tuple[float, float] | None = None) -> Fit:
    """Least squares of y = lo + (hi - lo) sigmoid(k (x - x0)) with floor <= lo, hi <= ceiling (see sigmoid_bounds),
    from both signs of the slope; reported with lo <= hi."""
    floor, ceil = sigmoid_bounds(y, bounds)
    span = float(np.ptp(x)) or 1.0
    kmax = 200.0 / span
    lower = np.array([floor, floor, -kmax, x.min() - 3 * span])
    upper = np.array([ceil, ceil, kmax, x.max() + 3 * span])

    def resid(t):
        return laws.sigmoid(dict(zip(("lo", "hi", "k", "x0"), t)), x) - y

    ymin, ymax = float(y.min()), float(y.max())
    starts = [[init[k] for k in ("lo", "hi", "k", "x0")]] if init else \
        [[ymin, ymax, s * 8 / span, float(np.median(x))] for s in (-1, 1)]
    best = None
    for p0 in starts:
        p0 = np.clip(np.array(p0, float), lower + 1e-9 * (upper - lower), upper - 1e-9 * (upper - lower))
        r = optimize.least_squares(resid, np.nan_to_num(p0), bounds=(lower, upper), method="trf", x_scale="jac",
                                   max_nfev=2000)
        if best is None or r.cost < best.cost:
            best = r
    def restart(x0):
        r = optimize.least_squares(resid, np.clip(x0, lower, upper), bounds=(lower, upper), method="trf",
                                   x_scale="jac", max_nfev=2000, **_TIGHT)
        return r.x, float(2 * r.cost)

    theta, loss, converged, drop = polish(restart, best.x, float(2 * best.cost), len(y), 4,
                                          _floor(len(y), float(np.abs(y).max()) or 1.0))
    p = dict(zip(("lo", "hi", "k", "x0"), (float(v) for v in theta)))
    if p["lo"] > p["hi"]:  # (lo, hi, k) and (hi, lo, -k) are one curve: report lo <= hi
        p = {"lo": p["hi"], "hi": p["lo"], "k": -p["k"], "x0": p["x0"]}
    fit = Fit("sigmoid", p, loss, converged,
              extra={"bounds": [floor, ceil], "lower": lower.tolist(), "upper": upper.tolist()})
    tol = 1e-6 * (ceil - floor) if math.isfinite(ceil - floor) else 0
    for name in ("lo", "hi"):
        for edge, what in ((floor, "floor"), (ceil, "ceiling")):
            if math.isfinite(edge) and abs(p[name] - edge) <= tol:
                fit.warnings.append(f"the asymptote {name}={p[name]:.4g} sits on the {what} {edge:g}: the data do not "
                                    f"determine it (set --bounds, or add points further along x)")
    outside = int(np.sum((y < floor) | (y > ceil)))
    if outside:
        fit.warnings.append(f"{outside} points lie outside the bounds [{floor:g}, {ceil:g}] (noise around chance?)")
    if abs(abs(p["k"]) - kmax) < 1e-6 * kmax:
        fit.warnings.append(f"the slope k={p['k']:.4g} sits at its limit (a step, not a sigmoid)")
    if not x.min() <= p["x0"] <= x.max():
        fit.warnings.append(f"the midpoint x0={p['x0']:.4g} lies outside the data [{x.min():.4g}, {x.max():.4g}]")
    if not converged:
        fit.warnings.append(f"the sigmoid fit did not converge (a restart still lowered its objective by {drop:.3g})")
    return fit


def fit_form(form: str, cols: dict[str, np.ndarray], init: dict[str, float] | None = None,
             bounds: tuple[float, float] | None = None) -> Fit:
    with single_threaded_blas(), np.errstate(all="ignore"):
        return _fit_form(form, cols, init, bounds)


def _fit_form(form: str, cols: dict[str, np.ndarray], init: dict[str, float] | None = None,
              bounds: tuple[float, float] | None = None) -> Fit:
    if form == "power":
        return fit_power(cols["x"], cols["y"], init)
    if form == "chinchilla":
        return fit_chinchilla(cols["n"], cols["d"], cols["y"], init)
    if form == "isoflop":
        return fit_isoflop(cols["n"], cols["c"], cols["y"])
    if form == "sigmoid":
        return fit_sigmoid(cols["x"], cols["y"], init, bounds)
    raise UsageProblem(f"unknown --form {form!r}", hint="use " + ", ".join(laws.FORMS))


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
