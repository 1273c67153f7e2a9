"""`scale-fit --form downstream`: compute -> loss -> accuracy in two steps (as Llama 3, Dubey et al. 2024, section
3.2.1): a power law L(C) = a C^b + c, then a bounded sigmoid acc(L), with the uncertainty of both steps propagated
to the predicted accuracy.

Propagation: at a --predict compute C*, step 1 gives L* with its profile-likelihood interval [L-, L+]; step 2 maps
both ends through the fitted sigmoid (the part of the accuracy's uncertainty that comes from the loss), and gives its
own profile-likelihood interval at L* (the part that comes from the sigmoid). The two parts are combined per side
in quadrature, which treats the two steps' errors as independent; the result is clipped to the sigmoid's bounds.
The measured coverage is in bench/RESULTS.md."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gentool import console
from gentool.errors import UsageProblem
from gentool.scaling import laws
from gentool.scaling.fit import fit_form, holdout_errors, holdout_summary, largest_runs
from gentool.scaling.intervals import Interval
from gentool.scaling.profiles import power_problem, profile_all, sigmoid_problem

MEANING = ("95% intervals: profile likelihood for each step's parameters; for a predicted accuracy, the loss "
           "interval of step 1 mapped through the sigmoid and the sigmoid's own profile interval, combined per side "
           "in quadrature")


def propagate(acc: float, acc_at_loss_ends: tuple[float, float], step2: Interval, floor: float,
              ceil: float) -> Interval:
    """Combine the two steps' parts of a predicted accuracy's interval per side, in quadrature."""
    down1 = max(acc - min(acc_at_loss_ends), 0.0)
    up1 = max(max(acc_at_loss_ends) - acc, 0.0)
    down2, up2 = max(acc - step2.lo, 0.0), max(step2.hi - acc, 0.0)
    lo, hi = acc - math.hypot(down1, down2), acc + math.hypot(up1, up2)
    return Interval(max(lo, floor), min(hi, ceil), "two-step propagation", open_lo=step2.open_lo,
                    open_hi=step2.open_hi)


def fit_downstream(cols: dict[str, np.ndarray], at: list[float], bounds, intervals: bool = True) -> dict[str, Any]:
    """cols: x (compute), v (loss), y (accuracy). Returns both fits, their intervals and the predictions."""
    f1 = fit_form("power", {"x": cols["x"], "y": cols["v"]})
    f2 = fit_form("sigmoid", {"x": cols["v"], "y": cols["y"]}, bounds=bounds)
    floor, ceil = f2.extra["bounds"]
    losses = [float(laws.power(f1.params, np.array(c))) for c in at]
    accs = [float(laws.sigmoid(f2.params, np.array(v))) for v in losses]
    ivs1: dict[str, Interval] = {}
    ivs2: dict[str, Interval] = {}
    preds_iv: list[Interval | None] = [None] * len(at)
    if intervals:
        p1, q1 = power_problem(f1, cols["x"], cols["v"])
        ivs1 = profile_all(p1, q1(at), len(cols["x"]))
        p2, q2 = sigmoid_problem(f2, cols["v"], cols["y"])
        ivs2 = profile_all(p2, q2(losses), len(cols["y"]))
        for i, (loss_iv, acc) in enumerate(zip((ivs1[f"predict{i}.y"] for i in range(len(at))), accs)):
            ends = tuple(float(laws.sigmoid(f2.params, np.array(v))) for v in (loss_iv.lo, loss_iv.hi))
            preds_iv[i] = propagate(acc, ends, ivs2[f"predict{i}.y"], floor, ceil)
    return {"step1": f1, "step2": f2, "ivs1": ivs1, "ivs2": ivs2, "losses": losses, "accs": accs,
            "pred_ivs": preds_iv}


def downstream_result(cols: dict[str, np.ndarray], runs: np.ndarray, train: np.ndarray, at_points: list[dict],
                      bounds, intervals: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scale-fit result for the downstream form (the caller reads the table and splits the holdout)."""
    at = []
    for a in at_points:
        if len(a) != 1:
            raise UsageProblem("downstream predictions take one compute value", hint="e.g. --predict C=1e21")
        at.append(next(iter(a.values())))
    tr = {k: v[train] for k, v in cols.items()}
    r = fit_downstream(tr, at, bounds, intervals)
    f1, f2 = r["step1"], r["step2"]
    for w in f1.warnings + f2.warnings:
        console.warn(w)

    def entry(v: float, iv: Interval | None) -> dict[str, Any]:
        return {"value": v, "ci95": None} if iv is None else {"value": v, **iv.as_dict()}

    params = {f"loss.{k}": entry(v, r["ivs1"].get(k)) for k, v in f1.params.items()}
    params.update({f"acc.{k}": entry(v, r["ivs2"].get(k)) for k, v in f2.params.items()})
    preds = [{"at": a, "x": {"value": c, "ci95": None}, "loss": entry(r["losses"][i], r["ivs1"].get(f"predict{i}.y")),
              "y": entry(r["accs"][i], r["pred_ivs"][i])} for i, (a, c) in enumerate(zip(at_points, at))]
    held = ~train
    two_step = laws.sigmoid(f2.params, laws.power(f1.params, cols["x"]))
    holdout = holdout_errors(runs[held], cols["y"][held], two_step[held]) if held.any() else []
    resid = (cols["y"] - two_step)[train]
    data = [{"run": str(run), "x": float(x), "loss": float(v), "y": float(y), "fitted": float(f),
             "held_out": bool(h)} for run, x, v, y, f, h in zip(runs, cols["x"], cols["v"], cols["y"], two_step, held)]
    result = {"form": "downstream", "params": params, "predictions": preds, "holdout": holdout,
              "holdout_summary": holdout_summary(holdout), "warnings": f1.warnings + f2.warnings,
              "fit_loss": f1.loss + f2.loss, "converged": f1.converged and f2.converged,
              "rmse": float(np.sqrt(np.mean(resid**2))), "max_abs_residual": float(np.abs(resid).max()),
              "bounds": f2.extra["bounds"], "data": data}
    return result, r


def holdout_runs(runs: np.ndarray, x: np.ndarray, k: int) -> list[str]:
    return largest_runs(runs, x, k) if k else []
