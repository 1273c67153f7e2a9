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


def multi_power(eta, warmup, t, params, shape=(30.0, 1.0, 0.5)):
    """The multi-power law (Luo et al. 2025) by its defining sums, with its own annealing shape (tau, beta, gamma):
    L(t) = L0 + A (sum_{j<t} eta_j)^-alpha - B sum_{W<k<t} (eta_{k-1} - eta_k) G(eta_k^-gamma sum_{k<=j<t} eta_j),
    G(x) = 1 - (1 + x / tau)^-beta; eta in units of the peak, t 1-based step counts."""
    l0, a, alpha, b = params
    tau, beta, gamma = shape
    cum = np.concatenate([[0.0], np.cumsum(eta)])
    out = []
    for tt in t:
        k = np.arange(warmup + 1, tt)
        x = (cum[tt] - cum[k]) / eta[k] ** gamma
        out.append(l0 + a * cum[tt] ** -alpha - b * np.sum((eta[k - 1] - eta[k]) * (1 - (1 + x / tau) ** -beta)))
    return np.array(out)


def curve_run(root, name, *, steps=1200, schedule="cosine", lr=3e-3, warmup=60, params=CURVE, noise=0.004,
              upto=None, finished=False, every=20, seed=0, lr_scale=1.0, cooldown=0.2, shape=None, rho=0.0):
    """A train-lm run directory whose validation loss follows the multi-power law exactly (plus noise): run.json
    (unfinished: name.partial/) or manifest.json, and metrics.jsonl up to step `upto`. cooldown: WSD's decay
    fraction (the recipe names it only when not the default 0.2, as train-lm's does). shape: generate with this
    annealing shape (tau, beta, gamma) instead of the forecaster's own (a law it does not assume); rho: the
    evaluation noise's lag-1 autocorrelation (AR(1), as the same eval batch seen by a slowly moving model gives)."""
    import json
    import math
    from pathlib import Path

    from gentool.scaling.curve import Schedule, law
    from gentool.train.schedules import lr_at

    rng = np.random.default_rng(seed)
    eta = np.array([lr_at(i, total=steps, lr=lr, warmup=warmup, schedule=schedule, decay_fraction=cooldown)
                    for i in range(steps)])
    sch = Schedule(eta / lr, warmup, lr)
    t = np.arange(every, steps + 1, every)
    theta = np.array([params[0], math.log(params[1]), params[2], math.log(params[3])])
    clean = law(theta, *sch.features(t)) if shape is None else multi_power(eta / lr, warmup, t, params, shape)
    e = rng.normal(0, noise, len(t))
    for i in range(1, len(e)):   # AR(1) with marginal sd `noise`
        e[i] = rho * e[i - 1] + math.sqrt(1 - rho * rho) * e[i]
    y = clean + e
    train = {"steps": steps, "lr": lr, "warmup": warmup, "schedule": schedule, "min_lr_ratio": 0.1, "seed": seed,
             **({"cooldown": cooldown} if cooldown != 0.2 else {})}
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
    end = np.array([steps])
    truth = law(theta, *sch.features(end)) if shape is None else multi_power(eta / lr, warmup, end, params, shape)
    return run, float(truth[0])
