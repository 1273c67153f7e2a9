"""How honest are scale-fit's 95% bootstrap intervals? Coverage of the true parameters on synthetic data.

    python bench/scale_fit.py [--trials 40] [--bootstrap 100]

For each form, `trials` data sets are drawn from known parameters plus noise (as in tests/scaling), each is fitted
with `--bootstrap` resamples over runs, and the fraction of intervals containing the truth is printed (0.95 would be
exact) with the median fit + bootstrap time. CPU only: scale-fit has no GPU part (--device is accepted and ignored)."""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]   # bench/tokenize.py shadows stdlib
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "src"))

import argparse
import importlib.util
import time
import warnings
from pathlib import Path

import numpy as np

from gentool.scaling import laws
from gentool.scaling.fit import bootstrap, fit_form

_spec = importlib.util.spec_from_file_location("_synth", Path(__file__).parents[1] / "tests/scaling/_synth.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)


def _data(form: str, seed: int):
    rng = np.random.default_rng(seed)
    if form == "power":
        rows = synth.power_rows(seed)
        return {"x": np.array([r["C"] for r in rows]), "y": np.array([r["loss"] for r in rows])}, \
            {"a": 1e4, "b": -0.3, "c": 1.8}
    if form == "chinchilla":
        rows = synth.chinchilla_rows(seed)
        return {k: np.array([r[c] for r in rows]) for k, c in (("n", "N"), ("d", "D"), ("y", "loss"))}, synth.CHIN
    if form == "sigmoid":
        x = np.linspace(0.5, 4.5, 30)
        return {"x": x, "y": 0.25 + 0.65 / (1 + np.exp(3.0 * (x - 2.5))) + rng.normal(0, 0.01, x.size)}, \
            {"lo": 0.25, "hi": 0.9, "k": -3.0, "x0": 2.5}
    n, c, y = [], [], []
    for cc in (1e15, 1e16, 1e17, 1e18):
        for f in (0.125, 0.25, 0.5, 1, 2, 4, 8):
            n.append(0.1 * cc**0.5 * f)
            c.append(cc)
            y.append(2 + 30 * cc**-0.1 + 0.05 * np.log(f) ** 2 + rng.normal(0, 0.002))
    return {"n": np.array(n), "c": np.array(c), "y": np.array(y)}, {"kN": 0.1, "aN": 0.5}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--bootstrap", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"| form | parameter | coverage of 95% CI ({args.trials} data sets) | median s per fit+bootstrap |")
    print("|---|---|---|---|")
    for form in laws.FORMS:
        hits: dict[str, list[bool]] = {}
        times = []
        for seed in range(args.trials):
            cols, true = _data(form, seed)
            t0 = time.perf_counter()
            fit = fit_form(form, cols)
            runs = np.array([f"r{i:03d}" for i in range(len(cols["y"]))])
            ci, _ = bootstrap(form, cols, runs, fit, args.bootstrap, seed, lambda f: {})
            times.append(time.perf_counter() - t0)
            for k, v in true.items():
                hits.setdefault(k, []).append(k in ci and ci[k][0] <= v <= ci[k][1])
        for k, h in hits.items():
            print(f"| {form} | {k} | {np.mean(h):.2f} | {np.median(times):.2f} |")


if __name__ == "__main__":
    main()
