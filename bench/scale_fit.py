"""How honest are scale-fit's 95% intervals? Coverage of the true parameters and predictions on synthetic data.

    python bench/scale_fit.py [--trials 200] [--bootstrap 200] [--forms power,sigmoid,...]

For each form, `trials` data sets are drawn from known parameters plus noise (the tests' generators), fitted, and
the fraction of 95% intervals that contain the truth is printed (0.95 would be exact; the goal is 0.93-0.97) with
its binomial standard error and the median seconds per fit + intervals. The methods are the ones scale-fit uses
(ci.py): profile likelihood for power and sigmoid, percentile bootstrap over runs for chinchilla (--bootstrap
resamples), Student t for isoflop, two-step propagation for downstream, and for curve the forecast's profile
interval on curves drawn from the multi-power law with B drawn from the forecast's prior (cut at 25% and 50% of
cosine / WSD runs).
CPU only: scale-fit has no GPU part (--device is accepted and ignored)."""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]   # bench scripts can shadow stdlib
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "src"))

import argparse
import importlib.util
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from gentool.scaling import laws
from gentool.scaling.ci import law_intervals
from gentool.scaling.fit import fit_form
from gentool.scaling.study import prediction

_spec = importlib.util.spec_from_file_location("_synth", Path(__file__).parents[1] / "tests/scaling/_synth.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)
FORMS = ("power", "chinchilla", "isoflop", "sigmoid", "downstream", "curve")


def _law_data(form: str, seed: int):
    """(columns, truth of every checked quantity, --predict points)."""
    rng = np.random.default_rng(seed)
    if form == "power":
        rows = synth.power_rows(seed)
        return {"x": np.array([r["C"] for r in rows]), "y": np.array([r["loss"] for r in rows])}, \
            {"a": 1e4, "b": -0.3, "c": 1.8, "predict0.y": 1e4 * 1e20**-0.3 + 1.8}, [{"X": 1e20}]
    if form == "chinchilla":
        rows = synth.chinchilla_rows(seed)
        cols = {k: np.array([r[c] for r in rows]) for k, c in (("n", "N"), ("d", "D"), ("y", "loss"))}
        return cols, {**synth.CHIN, "predict0.loss": float(laws.chinchilla(synth.CHIN, 1e10, 2e11))}, \
            [{"N": 1e10, "D": 2e11}]
    if form == "sigmoid":
        x = np.linspace(0.5, 4.5, 30)
        y = 0.25 + 0.65 / (1 + np.exp(3.0 * (x - 2.5))) + rng.normal(0, 0.01, x.size)
        return {"x": x, "y": y}, {"lo": 0.25, "hi": 0.9, "k": -3.0, "x0": 2.5,
                                  "predict0.y": 0.25 + 0.65 / (1 + math.exp(3.0 * 2.5))}, [{"X": 5.0}]
    n, c, y = [], [], []
    for cc in (1e15, 1e16, 1e17, 1e18):
        for f in (0.125, 0.25, 0.5, 1, 2, 4, 8):
            n.append(0.1 * cc**0.5 * f)
            c.append(cc)
            y.append(2 + 30 * cc**-0.1 + 0.05 * np.log(f) ** 2 + rng.normal(0, 0.002))
    return {"n": np.array(n), "c": np.array(c), "y": np.array(y)}, \
        {"kN": 0.1, "aN": 0.5, "predict0.N_opt": 0.1 * 1e20**0.5}, [{"C": 1e20}]


def _law_trial(form: str, seed: int, boot: int) -> dict[str, bool]:
    cols, truth, at = _law_data(form, seed)
    fit = fit_form(form, cols)

    def derive(f):
        d = laws.derived(f.form, f.params)
        for i, a in enumerate(at):
            d.update({f"predict{i}.{k}": v for k, v in prediction(f.form, f.params, a).items()})
        return d

    runs = np.array([f"r{i:03d}" for i in range(len(cols["y"]))])
    ivs, _ = law_intervals(form, cols, runs, fit, at, boot, seed, derive)
    return {k: k in ivs and ivs[k].lo <= v <= ivs[k].hi for k, v in truth.items()}


def _downstream_trial(seed: int, boot: int) -> dict[str, bool]:
    from gentool.scaling.downstream import fit_downstream

    rng = np.random.default_rng(seed)
    x = np.geomspace(1e17, 1e21, 16)
    loss = (50 * x**-0.08 + 1.7) * np.exp(rng.normal(0, 0.004, 16))
    acc = 0.25 + 0.7 / (1 + np.exp(6.0 * (loss - 2.6))) + rng.normal(0, 0.01, 16)
    r = fit_downstream({"x": x, "v": loss, "y": acc}, [1e22], None)
    lt = 50 * 1e22**-0.08 + 1.7
    at = 0.25 + 0.7 / (1 + math.exp(6.0 * (lt - 2.6)))
    li, ai = r["ivs1"]["predict0.y"], r["pred_ivs"][0]
    return {"predict loss": li.lo <= lt <= li.hi, "predict accuracy": ai.lo <= at <= ai.hi}


def _curve_trial(seed: int, boot: int) -> dict[str, bool]:
    from gentool.scaling.curve import PRIOR_B, PRIOR_SIGMA, fit_curve
    from gentool.scaling.forecast import _recipe, read_curve, schedule_of

    rng = np.random.default_rng(seed)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sched in ("cosine", "wsd"):
            b = PRIOR_B * 2.6 * math.exp(rng.normal(0, PRIOR_SIGMA))   # B from the prior (2.6: about the loss)
            run, truth = synth.curve_run(tmp, sched, steps=2000, warmup=100, schedule=sched, every=20, noise=0.006,
                                         params=(2.0, 1.5, 0.4, b), seed=seed)
            t, y, _ = read_curve(run, "loss")
            sch = schedule_of(_recipe(run))
            for frac in (0.25, 0.5):
                keep = t <= frac * 2000
                iv = fit_curve(sch, t[keep], y[keep]).interval(2000)
                out[f"final loss from {frac:.0%} ({sched})"] = iv.lo <= truth <= iv.hi
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--first-seed", type=int, default=0, help="data sets first-seed .. first-seed + trials - 1")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"| form | quantity | coverage of 95% intervals ({args.trials} data sets) | +/- (1 s.e.) | "
          "median s per fit + intervals |")
    print("|---|---|---|---|---|")
    for form in args.forms.split(","):
        hits: dict[str, list[bool]] = {}
        times = []
        for seed in range(args.first_seed, args.first_seed + args.trials):
            t0 = time.perf_counter()
            trial = {"downstream": _downstream_trial, "curve": _curve_trial}.get(form)
            res = trial(seed, args.bootstrap) if trial else _law_trial(form, seed, args.bootstrap)
            times.append(time.perf_counter() - t0)
            for k, v in res.items():
                hits.setdefault(k, []).append(v)
        for k, h in hits.items():
            p = float(np.mean(h))
            print(f"| {form} | {k} | {p:.3f} | {math.sqrt(p * (1 - p) / len(h)):.3f} | {np.median(times):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
