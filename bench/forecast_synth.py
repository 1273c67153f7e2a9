"""How well does `scale-fit --form curve` forecast the final loss of runs it was not developed on? Synthetic held-out
runs from tests/scaling/_synth.py (the generator the tests use): 1,000 steps, WSD with several cooldown fractions
and cosine, a multi-power law whose annealing shape (tau, gamma) is not the forecaster's fixed one, annealing drops B
drawn from the forecaster's prior, AR(1)-correlated evaluation noise. Each run is cut at 25%, 50% and 75% of its
steps and forecast in-process (the same code path as the CLI); the error is (forecast - truth) / truth of the
noiseless final loss, coverage counts the 95% intervals that contain it.

    python bench/forecast_synth.py [--cuts 0.25 0.5 0.75]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
_spec = importlib.util.spec_from_file_location("_scaling_synth", ROOT / "tests" / "scaling" / "_synth.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)

STEPS, WARMUP, EVERY = 1000, 50, 10
SCHEDULES = [("wsd", 0.1), ("wsd", 0.2), ("wsd", 0.3), ("wsd", 0.5), ("cosine", 0.2)]


def held_out_runs(n_laws: int = 2) -> list[dict]:
    """The held-out set: every schedule under n_laws laws (seeded, so the tests and this bench see the same runs)."""
    rng = np.random.default_rng(2025)
    runs = []
    for j in range(n_laws):
        l0, a, alpha = rng.uniform(2.0, 3.5), rng.uniform(0.8, 2.0), rng.uniform(0.35, 0.7)
        shape = (float(rng.uniform(15, 60)), 1.0, float(rng.uniform(0.35, 0.65)))
        b = 0.05 * (l0 + 0.2) * math.exp(rng.normal(0, 0.5) / 2)   # inside the prior's central 68%
        for k, (schedule, cooldown) in enumerate(SCHEDULES):
            runs.append({"name": f"law{j}-{schedule}{'' if schedule == 'cosine' else f'-{cooldown:g}'}",
                         "schedule": schedule, "cooldown": cooldown, "params": (l0, a, alpha, b), "shape": shape,
                         "seed": 100 * j + k})
    return runs


def forecast(root: Path, run: dict, frac: float) -> dict:
    from gentool.scaling.study import StudyOptions, run_study

    path, truth = synth.curve_run(root, f"{run['name']}-{int(100 * frac)}", steps=STEPS, warmup=WARMUP, every=EVERY,
                                  schedule=run["schedule"], cooldown=run["cooldown"], params=run["params"],
                                  shape=run["shape"], noise=0.004, rho=0.5, seed=run["seed"], upto=int(frac * STEPS))
    pred = run_study(StudyOptions([str(path)], form="curve"))["predictions"][0]["loss"]
    lo, hi = pred["ci95"]
    return {"err": (pred["value"] - truth) / truth, "covered": lo <= truth <= hi, "ci": (lo, hi), "truth": truth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuts", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--laws", type=int, default=2)
    args = ap.parse_args()
    runs = held_out_runs(args.laws)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(r, {c: forecast(Path(tmp), r, c) for c in args.cuts}) for r in runs]
    print("| run | " + " | ".join(f"from {c:.0%}: error [95% interval]" for c in args.cuts) + " |")
    print("|---|" + "---|" * len(args.cuts))
    for r, res in rows:
        cells = [f"{100 * v['err']:+.2f}% [{100 * (v['ci'][0] / v['truth'] - 1):+.1f}, "
                 f"{100 * (v['ci'][1] / v['truth'] - 1):+.1f}]" + ("" if v["covered"] else " miss")
                 for v in res.values()]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    for c in args.cuts:
        errs = [abs(res[c]["err"]) for _, res in rows]
        print(f"from {c:.0%}: mean |error| {100 * np.mean(errs):.2f}%, max {100 * max(errs):.2f}%, "
              f"coverage {sum(res[c]['covered'] for _, res in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
