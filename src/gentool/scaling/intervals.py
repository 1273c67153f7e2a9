"""Confidence intervals, one method per form, chosen by measured coverage (bench/scale_fit.py, bench/RESULTS.md):

- profile likelihood (profile-t, Bates & Watts 1988 ch. 6) for the least-squares forms (power, sigmoid, the
  learning curve and both steps of downstream): the values v of a quantity q for which the best fit with q = v has
  a residual sum of squares within the F-test's threshold SSE_min (1 + t^2_{n-p} / (n - p)). Exact for linear
  models; for nonlinear ones it follows the curvature that Wald and percentile intervals miss. A profile that
  reaches a parameter's bound before the threshold leaves that end open: the interval runs to the bound, flagged.
- the percentile bootstrap over runs for Chinchilla, whose Huber objective has no likelihood to profile (ci.py;
  BCa was measured and did worse there); resamples that end on a parameter's bound are counted, and an interval
  that reaches a bound is flagged open at that end.
- Student-t intervals of the second-stage regression for isoFLOP (linear in log C).

Every interval is 95%, and every returned interval is [lo, hi] with the flags open_lo / open_hi.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

LEVEL = 0.95


@dataclass
class Interval:
    lo: float
    hi: float
    method: str
    open_lo: bool = False      # the interval reaches a bound (or the search limit) at this end: not determined
    open_hi: bool = False
    bound_hits: int = 0        # bootstrap resamples whose fit ended on a parameter bound

    def as_dict(self) -> dict:
        d = {"ci95": [self.lo, self.hi], "method": self.method}
        if self.open_lo or self.open_hi:
            d["open"] = [e for e, o in (("low", self.open_lo), ("high", self.open_hi)) if o]
        if self.bound_hits:
            d["bound_hits"] = self.bound_hits
        return d


# ---------------------------------------------------------------- profile likelihood (least squares)

@dataclass
class Quantity:
    """A quantity q(theta) to profile: fixing q = v is done by `solve(v, theta)`, which returns theta with one
    parameter (`index`) changed so that q = v, or None when no such theta exists within the bounds."""
    name: str
    value: float
    index: int
    solve: Callable[[float, np.ndarray], np.ndarray | None]
    scale: float = 1.0         # a typical step (the Wald standard error) to bracket the interval
    lower: float = -math.inf   # q's own range (a parameter's bounds)
    upper: float = math.inf
    profile: Callable[[float], float] | None = None   # min SSE with q = v, when the form computes it itself


def param_quantity(name: str, theta: np.ndarray, j: int, se: float, lo: float, hi: float) -> Quantity:
    def solve(v, th):
        th = th.copy()
        th[j] = v
        return th
    return Quantity(name, float(theta[j]), j, solve, se, lo, hi)


@dataclass
class LSProblem:
    """Weighted least squares: resid(theta) -> residual vector (already divided by each point's scale)."""
    resid: Callable[[np.ndarray], np.ndarray]
    theta: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    warnings: list[str] = field(default_factory=list)

    def sse(self, th: np.ndarray) -> float:
        r = self.resid(th)
        return float(r @ r) if np.all(np.isfinite(r)) else math.inf

    def jacobian(self, th: np.ndarray) -> np.ndarray:
        r0 = self.resid(th)
        cols = []
        for j in range(len(th)):
            h = 1e-6 * max(abs(th[j]), 1e-3)
            t = th.copy()
            t[j] = t[j] + h if t[j] + h <= self.upper[j] else t[j] - h
            cols.append((self.resid(t) - r0) / (t[j] - th[j]))
        return np.stack(cols, 1)

    def wald_se(self) -> np.ndarray:
        """Standard errors s^2 (J'J)^-1 (scales for the profile search; never the reported interval)."""
        n, p = len(self.resid(self.theta)), len(self.theta)
        s2 = self.sse(self.theta) / max(n - p, 1)
        J = self.jacobian(self.theta)
        try:
            cov = s2 * np.linalg.pinv(J.T @ J)
            se = np.sqrt(np.clip(np.diag(cov), 0, None))
        except np.linalg.LinAlgError:
            se = np.full(p, np.nan)
        return np.where(np.isfinite(se) & (se > 0), se, np.maximum(np.abs(self.theta) * 0.1, 1e-3))


def _constrained_min(problem: LSProblem, q: Quantity, v: float, start: np.ndarray) -> tuple[float, np.ndarray]:
    """min SSE over theta with q(theta) = v: least squares over the free parameters (all but q.index)."""
    free = [j for j in range(len(start)) if j != q.index]

    def full(f):
        th = start.copy()
        th[free] = f
        return q.solve(v, th)

    def resid(f):
        th = full(f)
        if th is None or np.any(th < problem.lower - 1e-12) or np.any(th > problem.upper + 1e-12):
            return np.full(len(r0), 1e6)
        r = problem.resid(th)
        return np.where(np.isfinite(r), r, 1e6)

    th0 = full(start[free])
    r0 = problem.resid(problem.theta)
    if not free:
        return (problem.sse(th0) if th0 is not None else math.inf), th0
    lo, hi = problem.lower[free], problem.upper[free]
    x0 = np.clip(start[free], lo, hi)
    try:
        r = optimize.least_squares(resid, x0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=400)
    except ValueError:
        return math.inf, start
    th = full(r.x)
    if th is None:
        return math.inf, start
    return float(2 * r.cost) if r.cost < 1e11 else math.inf, th


def profile_interval(problem: LSProblem, q: Quantity, n: int, level: float = LEVEL, max_steps: int = 40,
                     inflation: float = 1.0) -> Interval:
    """The profile-t interval of q: {v : SSE_q(v) <= SSE_min (1 + inflation t^2 / dof)}, dof = n - p.
    inflation > 1 widens it for correlated residuals (the variance inflation of an AR(1) series)."""
    p = len(problem.theta)
    dof = max(n - p, 1)
    sse_min = problem.sse(problem.theta)
    t = stats.t.ppf(0.5 + level / 2, dof)
    limit = sse_min * (1 + inflation * t * t / dof) if sse_min > 0 else 1e-300
    ends, opens = [], []
    for sign in (-1, 1):
        v_in, th_in = q.value, problem.theta.copy()
        step = q.scale
        v_out, found, at_bound = None, False, False
        edge = q.lower if sign < 0 else q.upper
        for _ in range(max_steps):
            v = v_in + sign * step
            if (sign < 0 and v <= edge) or (sign > 0 and v >= edge):
                v = edge
                at_bound = True
            s, th = (q.profile(v), th_in) if q.profile else _constrained_min(problem, q, v, th_in)
            if s > limit:
                v_out, found = v, True
                break
            v_in, th_in = v, th
            if at_bound:
                break
            step *= 1.6
        if not found:
            ends.append(v_in)
            opens.append(True)
            continue

        def g(v, start=th_in):
            return (q.profile(v) if q.profile else _constrained_min(problem, q, v, start)[0]) - limit

        try:
            ends.append(optimize.brentq(g, v_in, v_out, xtol=1e-10 * max(1.0, abs(q.value)) + 1e-14 * abs(q.scale),
                                        rtol=1e-7, maxiter=60) if g(v_in) < 0 < g(v_out) else 0.5 * (v_in + v_out))
        except ValueError:
            ends.append(0.5 * (v_in + v_out))
        opens.append(False)
    return Interval(min(ends), max(ends), "profile likelihood", open_lo=opens[0], open_hi=opens[1])


# ---------------------------------------------------------------- linear regression (isoFLOP's second stage)

def linear_t_intervals(x: np.ndarray, y: np.ndarray, x_new: list[float], level: float = LEVEL) -> dict:
    """Least squares y = b0 + b1 x with Student-t intervals of b0, b1 and of the line at x_new (dof = n - 2)."""
    X = np.stack([np.ones_like(x), x], 1)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(x) - 2
    resid = y - X @ beta
    if dof < 1:
        return {"beta": beta, "se": None}
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.inv(X.T @ X)
    t = stats.t.ppf(0.5 + level / 2, dof)
    out = {"beta": beta, "t": t, "se": np.sqrt(np.diag(cov)), "line": []}
    for xn in x_new:
        v = np.array([1.0, xn])
        out["line"].append((float(v @ beta), float(math.sqrt(v @ cov @ v))))
    return out
