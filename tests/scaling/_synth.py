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
