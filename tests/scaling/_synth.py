"""Synthetic scaling data from known laws (loaded by the tests with importlib: tests are not a package)."""

import csv

import numpy as np


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


CHIN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_rows(seed, noise=0.002, sizes=5, budgets=5):
    """A grid of (N, D) runs whose loss follows Hoffmann et al.'s fitted law times log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.geomspace(1e6, 1e9, sizes):
        for d in np.geomspace(1e8, 1e11, budgets):
            loss = CHIN["E"] + CHIN["A"] / n ** CHIN["alpha"] + CHIN["B"] / d ** CHIN["beta"]
            rows.append({"run": f"n{n:.3g}-d{d:.3g}", "N": n, "D": d, "C": 6 * n * d,
                         "loss": loss * np.exp(rng.normal(0, noise))})
    return rows


def power_rows(seed, a=1e4, b=-0.3, c=1.8, noise=0.003, n=20):
    rng = np.random.default_rng(seed)
    return [{"run": f"r{i}", "C": x, "loss": (a * x**b + c) * np.exp(rng.normal(0, noise))}
            for i, x in enumerate(np.geomspace(1e12, 1e18, n))]


CURVE = (2.5, 1.2, 0.5, 0.3)   # L0, A, alpha, B of the multi-power law (curve.py): eta in units of the peak


def curve_run(root, name, *, steps=1200, schedule="cosine", lr=3e-3, warmup=60, params=CURVE, noise=0.004,
              upto=None, finished=False, every=20, seed=0, lr_scale=1.0):
    """A train-lm run directory whose validation loss follows the multi-power law exactly (plus noise): run.json
    (unfinished: name.partial/) or manifest.json, and metrics.jsonl up to step `upto`."""
    import json
    import math
    from pathlib import Path

    from gentool.scaling.curve import Schedule, law
    from gentool.train.schedules import lr_at

    rng = np.random.default_rng(seed)
    eta = np.array([lr_at(i, total=steps, lr=lr, warmup=warmup, schedule=schedule) for i in range(steps)])
    sch = Schedule(eta / lr, warmup, lr)
    t = np.arange(every, steps + 1, every)
    s, d = sch.features(t)
    theta = np.array([params[0], math.log(params[1]), params[2], math.log(params[3])])
    y = law(theta, s, d) + rng.normal(0, noise, len(t))
    train = {"steps": steps, "lr": lr, "warmup": warmup, "schedule": schedule, "min_lr_ratio": 0.1, "seed": seed}
    run = Path(root) / (name if finished else name + ".partial")
    run.mkdir(parents=True, exist_ok=True)
    upto = steps if upto is None else upto
    lines = [json.dumps({"step": int(a), "tokens": int(a) * 1024, "flops": a * 1e9, "loss": float(b) + 0.05,
                         "val_loss": float(b), "lr": float(eta[a - 1]) * lr_scale, "grad_norm": 0.5,
                         "tokens_per_s": 1e4, "seconds": float(a)}) for a, b in zip(t, y) if a <= upto]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (run / "manifest.json").write_text(json.dumps({"format": "gentool.lm-checkpoint", "format_version": 1,
                                                       "config": {"train": train}, "contents": {"step": steps},
                                                       "metrics": {"val_loss": float(y[-1])}}))
    else:
        (run / "run.json").write_text(json.dumps({"train": train}))
    truth = float(law(theta, *sch.features(np.array([steps])))[0])
    return run, truth
