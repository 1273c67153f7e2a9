"""The scaling-law forms: their formulas, parametrisations and derived quantities (no fitting here).

- power:      L(X) = a * X^b + c                     (X = compute, parameters or tokens; b < 0)
- chinchilla: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022), optimised in the log-sum-exp form
              log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e.
              Compute-optimal: N_opt(C) = G (C/6)^a, D_opt(C) = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)),
              a = beta / (alpha + beta), b = alpha / (alpha + beta).
- isoflop:    Approach 2: per compute budget a parabola of L in log N gives N_opt; then N_opt = kN C^a_N and
              D_opt = C / (6 N_opt) = kD C^a_D.
- sigmoid:    y = lo + (hi - lo) / (1 + exp(-k (x - x0))): accuracy against (normalised) loss, Llama 3's second step.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

FORMS = ("power", "chinchilla", "isoflop", "sigmoid", "downstream", "curve")   # curve: curve.py; downstream: both
ROLES = {"power": ("x", "y"), "chinchilla": ("n", "d", "y"), "isoflop": ("n", "c", "y"), "sigmoid": ("x", "y"),
         "downstream": ("x", "v", "y")}   # downstream: x compute, v loss (--via), y accuracy
POSITIVE = {"power": ("x", "y"), "chinchilla": ("n", "d", "y"), "isoflop": ("n", "c", "y"), "sigmoid": (),
            "downstream": ("x", "v")}
MIN_POINTS = {"power": 4, "chinchilla": 6, "isoflop": 6, "sigmoid": 5, "downstream": 5}   # more points than parameters
HUBER_DELTA = 1e-3
# Hoffmann et al. 2022's grid of initialisations for (a, b, e, alpha, beta)
CHIN_GRID = (np.arange(0, 26, 5.0), np.arange(0, 26, 5.0), np.arange(-1, 1.01, 0.5), np.arange(0, 2.01, 0.5),
             np.arange(0, 2.01, 0.5))
CHIN_BOUNDS = [(-20, 60), (-20, 60), (-10, 10), (0.0, 3.0), (0.0, 3.0)]
POWER_B_RANGE = (-5.0, -1e-6)


def power(p: dict[str, float], x: np.ndarray) -> np.ndarray:
    return p["a"] * x ** p["b"] + p["c"]


def chinchilla(p: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def chin_params(theta) -> dict[str, float]:
    a, b, e, alpha, beta = (float(t) for t in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def chin_theta(p: dict[str, float]) -> np.ndarray:
    return np.array([np.log(p["A"]), np.log(p["B"]), np.log(p["E"]), p["alpha"], p["beta"]])


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta)), np.clip(r, -delta, delta)


def chin_objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient in theta."""
    a, b, e, alpha, beta = theta
    t1, t2 = a - alpha * logn, b - beta * logd
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    loss, g = huber(m + np.log(s) - logl)
    g = g / s                                   # d lse / d t_i = w_i / s
    grad = np.array([np.sum(g * w1), np.sum(g * w2), np.sum(g * w3), -np.sum(g * w1 * logn),
                     -np.sum(g * w2 * logd)])
    return float(loss.sum()), grad


def chin_objective_grid(thetas: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray) -> np.ndarray:
    """The objective at many (a, b, e, alpha, beta) rows at once (ranks the grid of initialisations)."""
    a, b, e, alpha, beta = (thetas[:, i : i + 1] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * logn, b - beta * logd, e))
    m = terms.max(axis=0)
    lse = m + np.log(np.exp(terms - m).sum(axis=0))
    return huber(lse - logl)[0].sum(axis=1)


def compute_optimal(p: dict[str, float], c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chinchilla's compute-optimal N and D for compute C (C = 6 N D)."""
    alpha, beta = p["alpha"], p["beta"]
    g = (alpha * p["A"] / (beta * p["B"])) ** (1 / (alpha + beta))
    return g * (c / 6) ** (beta / (alpha + beta)), (c / 6) ** (alpha / (alpha + beta)) / g


def isoflop_nopt(p: dict[str, float], c: np.ndarray) -> np.ndarray:
    return p["kN"] * c ** p["aN"]


def isoflop_dopt(p: dict[str, float], c: np.ndarray) -> np.ndarray:
    return p["kD"] * c ** p["aD"]


def sigmoid(p: dict[str, float], x: np.ndarray) -> np.ndarray:
    return p["lo"] + (p["hi"] - p["lo"]) * expit(p["k"] * (np.asarray(x, float) - p["x0"]))   # no overflow


def predict(form: str, p: dict[str, float], cols: dict[str, np.ndarray]) -> np.ndarray:
    """The law's y at the points in cols (isoflop: N_opt at compute c)."""
    if form == "power":
        return power(p, cols["x"])
    if form == "chinchilla":
        return chinchilla(p, cols["n"], cols["d"])
    if form == "sigmoid":
        return sigmoid(p, cols["x"])
    return isoflop_nopt(p, cols["c"])


def derived(form: str, p: dict[str, float]) -> dict[str, float]:
    """Quantities derived from the parameters that get their own CIs."""
    if form == "chinchilla":
        s = p["alpha"] + p["beta"]
        return {"a": p["beta"] / s if s > 0 else float("nan"), "b": p["alpha"] / s if s > 0 else float("nan")}
    return {}
