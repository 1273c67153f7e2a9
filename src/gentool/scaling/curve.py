"""A learning-curve law that knows the learning-rate schedule, to forecast a run's final loss before it ends.

The multi-power law of Luo et al. 2025, "A Multi-Power Law for Loss Curve Prediction Across Learning Rate
Schedules" (ICLR 2025, arXiv:2503.12811):

    L(t) = L0 + A (S1(t) + S_W)^(-alpha) - LD(t)
    LD(t) = B sum_{k > W} (eta_{k-1} - eta_k) G(eta_k^(-gamma) S_k(t)),   G(x) = 1 - (1 + x / tau)^(-beta)

with S1 + S_W the summed learning rate (warmup included) up to step t, S_k(t) the learning rate summed from step k
to t, and W the warmup. Learning rates are measured in units of the peak (so S is in "steps at the peak rate", and
B is the loss drop of a full anneal), which makes the parameters comparable across peak learning rates.

What a partial run determines: L0, A and alpha from the curve so far; B only once the learning rate has decayed
(a cosine schedule after its first quarter, WSD only in its decay). The annealing response's shape (tau = 30
steps, beta = 1, gamma = 0.5) is fixed, and B has a log-normal prior (median 5% of the latest loss, a factor 2.7 either
side at two sigma) measured on gentool's own tuning runs (bench/forecast.py, kept apart from the evaluation
runs); before any decay, the forecast's annealing drop comes from that prior, and its interval says so by being
wider. The fit uses the evaluations in the later half of what has been logged (and after twice the warmup),
weighted by the evaluation noise (from the differences of consecutive evaluations); the 95% interval of a
prediction is a profile-likelihood interval of this penalised least-squares fit (intervals.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from gentool.errors import GentoolError
from gentool.scaling.intervals import Interval, LSProblem, Quantity, profile_interval

TAU, BETA, GAMMA = 30.0, 1.0, 0.5        # the annealing response's shape, in steps at the peak learning rate
PRIOR_B, PRIOR_SIGMA = 0.05, 0.5         # B ~ lognormal(median 5% of the latest loss, sigma 0.5 in log)
MIN_POINTS = 5


@dataclass
class Schedule:
    """Learning rates of every optimizer step (0-based) of a run, normalised by the peak, and its warmup."""
    eta: np.ndarray
    warmup: int
    peak: float

    @property
    def steps(self) -> int:
        return len(self.eta)

    def features(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """S(t): the summed learning rate after t steps; D(t): the annealing sum without B,
        sum_{k > W} (eta_{k-1} - eta_k) G(eta_k^-gamma S_k(t))."""
        t = np.asarray(t, int)
        if np.any(t < 1) or np.any(t > self.steps):
            raise GentoolError(f"step {int(t.min()) if np.any(t < 1) else int(t.max())} is outside the schedule "
                               f"(1..{self.steps})")
        cum = np.concatenate([[0.0], np.cumsum(self.eta)])
        w = self.warmup
        drop = np.zeros(self.steps)
        drop[w + 1:] = self.eta[w:-1] - self.eta[w + 1:]
        ks = np.flatnonzero(drop)
        dsum = np.zeros(len(t))
        for i, tt in enumerate(t):
            k = ks[ks < tt]
            if len(k):
                x = (cum[tt] - cum[k]) / np.maximum(self.eta[k], 1e-12) ** GAMMA
                dsum[i] = float(np.sum(drop[k] * (1 - (1 + x / TAU) ** -BETA)))
        return cum[t], dsum


def law(p: np.ndarray, s: np.ndarray, dsum: np.ndarray) -> np.ndarray:
    """p = (L0, log A, alpha, log B)."""
    return p[0] + np.exp(p[1]) * s ** -p[2] - np.exp(p[3]) * dsum


@dataclass
class CurveFit:
    params: dict[str, float]
    theta: np.ndarray
    problem: LSProblem
    schedule: Schedule
    t_fit: np.ndarray            # the steps fitted
    y_fit: np.ndarray
    noise: float                 # evaluation noise (sd), from consecutive differences
    observed_step: int
    rmse: float
    warnings: list[str] = field(default_factory=list)
    _b0: float = 0.0             # the prior's centre, log B

    def predict(self, steps: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        s, d = self.schedule.features(steps)
        return law(self.theta if theta is None else theta, s, d)

    def interval(self, step: int, level: float = 0.95) -> Interval:
        """The profile-likelihood interval of the loss at `step`, pinned through A (always feasible when the loss
        pinned lies above L0 - the annealing drop)."""
        s, d = self.schedule.features(np.array([step]))
        s, d = float(s[0]), float(d[0])

        def solve(v, th):
            rest = v - th[0] + math.exp(th[3]) * d
            if rest <= 0:
                return None
            th = th.copy()
            th[1] = math.log(rest) + th[2] * math.log(s)
            return th

        value = float(law(self.theta, np.array([s]), np.array([d]))[0])
        scale = max(self.noise, 1e-4) * 3
        r = self.predict(self.t_fit) - self.y_fit
        rho = float(np.corrcoef(r[:-1], r[1:])[0, 1]) if len(r) > 3 and np.std(r) > 0 else 0.0
        inflation = min(max((1 + rho) / (1 - rho), 1.0), 10.0) if rho < 1 else 10.0
        # Correlated residuals carry less information than their number says: the threshold on the data's SSE grows
        # by the AR(1) variance inflation. The prior on B is not a residual series: its term is weighted up by the
        # same factor, so that it still admits exactly its own 95% range (the threshold grows by inflation * t^2,
        # the prior's term by inflation * (delta log B / sigma)^2).
        w = math.sqrt(inflation)
        base = self.problem.resid

        def resid(th):
            out = np.array(base(th), float)
            out[-1] *= w
            return out

        prob = LSProblem(resid, self.theta, self.problem.lower, self.problem.upper)
        q = Quantity("loss", value, 1, solve, scale, 0.0, math.inf, profile=self._profile(s, d, w))
        with np.errstate(all="ignore"):
            return profile_interval(prob, q, len(self.t_fit) + 1, level=level, inflation=inflation)

    def _profile(self, s_at: float, d_at: float, prior_weight: float = 1.0):
        """min over the parameters of the penalised SSE with the loss at (s_at, d_at) pinned to v: variable
        projection again (L0 in closed form, A from the pin) over (alpha, log B) from several starts, because the
        (L0, A, alpha) valley defeats a local search from the previous point."""
        s, d = self.schedule.features(self.t_fit)
        y, noise, b0 = self.y_fit, self.noise, self._b0
        l0_max = float(y.min())

        def resid(q, v):
            alpha, log_b = q
            b = math.exp(log_b)
            u = (s / s_at) ** -alpha            # A s^-alpha = (v - L0 + B d_at) u
            x, z = 1 - u, y - (v + b * d_at) * u + b * d
            l0 = float(x @ z / (x @ x)) if x @ x > 0 else 0.0
            l0 = min(max(l0, 0.0), l0_max, v + b * d_at - 1e-12)
            fitted = l0 * x + (v + b * d_at) * u - b * d
            return np.concatenate([(fitted - y) / noise, [prior_weight * (log_b - b0) / PRIOR_SIGMA]])

        def profile(v: float) -> float:
            best = math.inf
            starts = [(self.theta[2], self.theta[3])] + [(a, b0) for a in (0.05, 0.2, 0.5, 1.0, 2.0)]
            with np.errstate(all="ignore"):
                for q0 in starts:
                    r = optimize.least_squares(resid, np.clip(q0, [1e-3, -30.0], [5.0, 5.0]), args=(v,),
                                               bounds=([1e-3, -30.0], [5.0, 5.0]), method="trf", max_nfev=200)
                    best = min(best, 2 * float(r.cost))
            return best

        return profile


def noise_sd(y: np.ndarray) -> float:
    """The evaluation noise: a robust sd of consecutive differences / sqrt 2 (the trend cancels)."""
    if len(y) < 3:
        return float(np.std(y)) or 1e-3
    dd = np.diff(np.diff(y))   # second differences remove a locally linear trend too: var = 6 sigma^2
    mad = float(np.median(np.abs(dd - np.median(dd)))) * 1.4826
    return max(mad / math.sqrt(6), 1e-4 * float(np.mean(np.abs(y))))


def fit_curve(schedule: Schedule, t: np.ndarray, y: np.ndarray) -> CurveFit:
    """Fit the law to the evaluations (t, y) of a run so far; t are step counts (1-based)."""
    order = np.argsort(t, kind="stable")
    t, y = np.asarray(t, int)[order], np.asarray(y, float)[order]
    ok = (t >= 1) & (t <= schedule.steps) & np.isfinite(y)
    t, y = t[ok], y[ok]
    if not len(t):
        raise GentoolError("no evaluations to fit yet")
    t_obs = int(t.max())
    start = max(2 * schedule.warmup, t_obs // 2)
    keep = t > start
    if keep.sum() < MIN_POINTS:
        keep = t > schedule.warmup
    if keep.sum() < MIN_POINTS:
        raise GentoolError(f"only {int(keep.sum())} evaluations after the warmup (step {schedule.warmup}); the "
                           f"forecast needs {MIN_POINTS}", hint="wait for more evaluations, or evaluate more often "
                                                                "(train-lm --eval-every)")
    tf, yf = t[keep], y[keep]
    noise = noise_sd(y[t > schedule.warmup])
    s, dsum = schedule.features(tf)
    b0 = math.log(PRIOR_B * yf[-1])

    def resid(p):
        return np.concatenate([(law(p, s, dsum) - yf) / noise, [(p[3] - b0) / PRIOR_SIGMA]])

    lower = np.array([0.0, -50.0, 1e-3, -30.0])
    upper = np.array([float(yf.min()), 50.0, 5.0, 5.0])

    def inner(alpha: float, log_b: float) -> np.ndarray:
        """L0 and A in closed form given alpha and B (the law is linear in them), within L0's bounds."""
        u, z = s ** -alpha, yf + math.exp(log_b) * dsum
        X = np.stack([np.ones_like(u), u], 1)
        (l0, a), *_ = np.linalg.lstsq(X, z, rcond=None)
        if not lower[0] <= l0 <= upper[0] or a <= 0:
            l0 = min(max(l0, lower[0]), upper[0])
            a = max(float(u @ (z - l0)) / float(u @ u), 1e-300)
        return np.array([l0, math.log(a), alpha, log_b])

    def outer(q):
        return resid(inner(q[0], q[1]))

    best = None
    with np.errstate(all="ignore"):
        for a0 in (0.1, 0.3, 0.7, 1.5):   # variable projection over (alpha, log B), then a joint polish
            r = optimize.least_squares(outer, [a0, b0], bounds=([1e-3, -30.0], [5.0, 5.0]), method="trf",
                                       max_nfev=300)
            if best is None or r.cost < best.cost:
                best = r
        p0 = np.clip(inner(*best.x), lower, upper)
        best = optimize.least_squares(resid, p0, bounds=(lower, upper), method="trf", x_scale="jac", max_nfev=500)
    theta = best.x
    prob = LSProblem(resid, theta, lower, upper)
    fitted = law(theta, s, dsum)
    params = {"L0": float(theta[0]), "A": float(math.exp(theta[1])), "alpha": float(theta[2]),
              "B": float(math.exp(theta[3])), "tau": TAU, "beta": BETA, "gamma": GAMMA}
    fit = CurveFit(params, theta, prob, schedule, tf, yf, noise, t_obs, float(np.sqrt(np.mean((fitted - yf) ** 2))),
                   _b0=b0)
    if theta[0] <= 1e-9:
        fit.warnings.append("the irreducible loss L0 sits at 0: the curve so far looks like a pure power law")
    decayed = 1 - float(schedule.eta[min(t_obs, schedule.steps) - 1])
    if decayed < 0.05 and schedule.eta[-1] < 0.95:
        fit.warnings.append("the learning rate has not decayed yet: the forecast's annealing drop comes from the "
                            "prior (B ~ 5% of the loss), not from this run")
    return fit
