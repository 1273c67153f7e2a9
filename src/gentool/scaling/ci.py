"""The 95% intervals of a law fit, one method per form (see intervals.py for the methods and bench/RESULTS.md for
their measured coverage):

- power, sigmoid: profile likelihood of the least-squares fit (parameters and predictions);
- chinchilla: percentile bootstrap over runs, with the resamples that end on a parameter bound counted and such
  intervals opened at that end. BCa (jackknife acceleration) was measured too, on the same 200 data sets: it
  under-covered B, beta and the prediction (0.915-0.92), where the percentile interval gives 0.94-0.95; the
  percentile interval over-covers A and alpha (0.985), which is the safer error;
- isoflop: Student-t intervals of the second stage (log N_opt against log C).

Also the band drawn in plot.png: pointwise intervals of the fitted curve on a grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gentool.errors import UsageProblem
from gentool.scaling import laws
from gentool.scaling.fit import Fit, fit_form
from gentool.scaling.intervals import Interval, linear_t_intervals
from gentool.scaling.profiles import power_problem, profile_all, sigmoid_problem

METHOD = {"power": "profile likelihood", "sigmoid": "profile likelihood",
          "chinchilla": "percentile bootstrap over runs",
          "isoflop": "Student t (second stage)"}
_CHIN_INDEX = {"A": 0, "B": 1, "E": 2, "alpha": 3, "beta": 4}


def _group_ids(runs: np.ndarray, max_groups: int | None = None) -> list[np.ndarray]:
    """Indices of each run's points, in the caller's (canonical) run order; at most max_groups groups of runs."""
    ids = list(dict.fromkeys(runs))
    members = [np.flatnonzero(runs == r) for r in ids]
    if max_groups and len(members) > max_groups:
        members = [np.concatenate(g) for g in np.array_split(np.array(members, dtype=object), max_groups)]
    return members


def bootstrap_draws(form: str, cols: dict[str, np.ndarray], runs: np.ndarray, fit: Fit, k: int, seed: int,
                    derive: Callable[[Fit], dict[str, float]]) -> tuple[dict[str, list[float]], list[dict], dict]:
    """Resample whole runs with replacement k times (seeded, in canonical run order) and refit from the full fit's
    optimum. Returns the draws of every quantity, the refitted parameter sets, and per parameter the number of
    resamples that ended on its lower / upper bound (chinchilla's log-space box)."""
    rng = np.random.default_rng(seed)
    members = _group_ids(runs)
    draws: dict[str, list[float]] = {}
    fits: list[dict[str, float]] = []
    hits: dict[str, list[int]] = {}
    for _ in range(k):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        try:
            f = fit_form(form, {c: v[idx] for c, v in cols.items()}, init=fit.params)
        except (UsageProblem, ValueError, np.linalg.LinAlgError):
            continue
        fits.append(f.params)
        for name, v in {**f.params, **derive(f)}.items():
            if math.isfinite(v):
                draws.setdefault(name, []).append(v)
        if form == "chinchilla":
            theta = laws.chin_theta(f.params)
            for name, i in _CHIN_INDEX.items():
                lo, hi = laws.CHIN_BOUNDS[i]
                h = hits.setdefault(name, [0, 0])
                h[0] += theta[i] < lo + 1e-3
                h[1] += theta[i] > hi - 1e-3
    return draws, fits, hits


def bootstrap_intervals(form: str, cols: dict[str, np.ndarray], runs: np.ndarray, fit: Fit, k: int, seed: int,
                        derive: Callable[[Fit], dict[str, float]]) -> tuple[dict[str, Interval], list[dict]]:
    """Percentile intervals of the bootstrap over runs (BCa measured worse for Chinchilla: see the module doc)."""
    draws, fits, hits = bootstrap_draws(form, cols, runs, fit, k, seed, derive)
    est = {**fit.params, **derive(fit)}
    out = {}
    for name, v in draws.items():
        if len(v) < max(2, k // 2) or not math.isfinite(est.get(name, math.nan)):
            continue   # refits failed more than half of the time: no interval
        lo, hi = (float(e) for e in np.percentile(np.array(v), [2.5, 97.5]))
        iv = Interval(lo, hi, METHOD[form])
        if name in hits:
            n_lo, n_hi = hits[name]
            iv.bound_hits = n_lo + n_hi
            b_lo, b_hi = laws.CHIN_BOUNDS[_CHIN_INDEX[name]]
            to_param = (lambda t: t) if name in ("alpha", "beta") else math.exp
            if n_lo >= 0.025 * len(v):   # the lower end is the bound itself: not determined by the data
                iv.lo, iv.open_lo = to_param(b_lo), True
            if n_hi >= 0.025 * len(v):
                iv.hi, iv.open_hi = to_param(b_hi), True
        out[name] = iv
    return out, fits


def isoflop_intervals(fit: Fit, at: list[dict[str, float]]) -> dict[str, Interval]:
    lc, ln = np.log(fit.extra["budgets"]), np.log(fit.extra["n_opt"])
    cs = [a["C"] for a in at if "C" in a]
    r = linear_t_intervals(lc, ln, [math.log(c) for c in cs])
    if r["se"] is None:
        return {}   # two budgets: a line through two points has no residual to judge it by
    t, (b0, b1), (s0, s1) = r["t"], r["beta"], r["se"]
    m = "Student t (second stage)"
    out = {"kN": Interval(math.exp(b0 - t * s0), math.exp(b0 + t * s0), m),
           "aN": Interval(b1 - t * s1, b1 + t * s1, m),
           "kD": Interval(math.exp(-math.log(6) - b0 - t * s0), math.exp(-math.log(6) - b0 + t * s0), m),
           "aD": Interval(1 - b1 - t * s1, 1 - b1 + t * s1, m)}
    for i, (c, (v, se)) in enumerate(zip(cs, r["line"])):
        out[f"predict{i}.N_opt"] = Interval(math.exp(v - t * se), math.exp(v + t * se), m)
        out[f"predict{i}.D_opt"] = Interval(c / 6 / math.exp(v + t * se), c / 6 / math.exp(v - t * se), m)
    return out


def law_intervals(form: str, cols: dict[str, np.ndarray], runs: np.ndarray, fit: Fit, at: list[dict[str, float]],
                  k: int, seed: int, derive: Callable[[Fit], dict[str, float]]) -> tuple[dict[str, Interval], Any]:
    """Intervals of every parameter, derived quantity and prediction, and what the plot's band needs (a function
    grid -> (lo, hi) arrays, or bootstrap parameter sets)."""
    if form in ("power", "sigmoid"):
        prob, quantities = (power_problem if form == "power" else sigmoid_problem)(fit, cols["x"], cols["y"])
        xs = [next(iter(a.values())) for a in at]
        ivs = profile_all(prob, quantities(xs), len(cols["y"]))

        def band(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            pts = grid[np.unique(np.linspace(0, len(grid) - 1, 13).round().astype(int))]
            iv = profile_all(prob, [q for q in quantities(list(pts)) if q.name.startswith("predict")], len(cols["y"]))
            lo = np.array([iv[f"predict{i}.y"].lo for i in range(len(pts))])
            hi = np.array([iv[f"predict{i}.y"].hi for i in range(len(pts))])
            return np.interp(grid, pts, lo), np.interp(grid, pts, hi)

        return ivs, band
    if form == "isoflop":
        def iso_band(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            r = linear_t_intervals(np.log(fit.extra["budgets"]), np.log(fit.extra["n_opt"]), list(np.log(grid)))
            if r["se"] is None:
                return np.full(len(grid), np.nan), np.full(len(grid), np.nan)
            v, se = np.array(r["line"]).T
            return np.exp(v - r["t"] * se), np.exp(v + r["t"] * se)

        return isoflop_intervals(fit, at), iso_band
    return bootstrap_intervals(form, cols, runs, fit, k, seed, derive)
