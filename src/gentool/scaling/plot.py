"""plot.png for a scale-fit: data, the fitted law, its bootstrap band where available, held-out runs marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gentool.scaling.fit import Fit, compute_optimal, predict


def plot_fit(path: Path, result: dict, cols: dict[str, np.ndarray], runs: np.ndarray, held: list[str],
             fit: Fit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    held_mask = np.isin(runs, held)
    y = cols["y"]
    if fit.form in ("power", "sigmoid"):
        x = cols["x"]
        far = max([x.max()] + [p["x"]["value"] for p in result["predictions"] if "x" in p])
        grid = np.geomspace(x.min(), far, 200) if fit.form == "power" else np.linspace(x.min(), x.max(), 200)
        ax.plot(grid, predict(fit, {"x": grid}), color="C0", label=f"fit ({fit.form})")
        ax.scatter(x[~held_mask], y[~held_mask], color="C0", s=18, label="runs used")
        if fit.form == "power":
            ax.set_xscale("log")
        xlabel = result["columns"]["x"]
    elif fit.form == "chinchilla":
        x = 6 * cols["n"] * cols["d"]
        sc = ax.scatter(x[~held_mask], y[~held_mask], c=np.log10(cols["n"][~held_mask]), s=18, cmap="viridis",
                        label="runs used")
        fig.colorbar(sc, ax=ax, label="log10 N")
        grid = np.geomspace(x.min(), x.max() * 100, 200)
        n, d = compute_optimal(fit.params, grid)
        ax.plot(grid, predict(fit, {"n": n, "d": d}), color="C1", label="compute-optimal frontier")
        ax.set_xscale("log")
        xlabel = "C = 6ND"
    else:  # isoflop: N_opt against C
        x, y = np.array(fit.extra["budgets"]), np.array(fit.extra["n_opt"])
        ax.scatter(x, y, color="C0", s=18, label="N_opt per budget")
        grid = np.geomspace(x.min(), x.max() * 100, 100)
        ax.plot(grid, predict(fit, {"c": grid}), color="C1", label="N_opt = k C^m")
        ax.set_xscale("log")
        ax.set_yscale("log")
        xlabel, held_mask = "C", np.zeros(len(x), dtype=bool)
    if held_mask.any():
        ax.scatter(x[held_mask], y[held_mask], marker="*", s=90, color="C3", label="held out (actual)")
    for p in result["predictions"]:
        if "x" in p:
            ax.errorbar([p["x"]["value"]], [p["y"]["value"]], fmt="D", color="C2", label="prediction",
                        yerr=None if not p["y"]["ci95"] else [[p["y"]["value"] - p["y"]["ci95"][0]],
                                                              [p["y"]["ci95"][1] - p["y"]["value"]]])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(result["columns"].get("y", "y") if fit.form != "isoflop" else "N_opt")
    ax.set_title(f"scale-fit: {fit.form}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
