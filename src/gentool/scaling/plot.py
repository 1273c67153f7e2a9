"""plot.png for a scale-fit: the data, the fitted law with its 95% band, the extrapolation region shaded up to the
predictions, and the held-out runs marked. Chinchilla adds a panel of iso-loss contours in (D, N).

matplotlib is an optional extra (`pip install 'gentool[plot]'`): importing it here raises ImportError, which the
caller turns into a warning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gentool.scaling import laws
from gentool.scaling.fit import Fit


def _band(ax, grid, band, curve: Callable[[dict, np.ndarray], np.ndarray], color: str, label: str) -> None:
    """The 95% band: band(grid) -> (lo, hi) (profile / t intervals), or bootstrap parameter sets (percentiles)."""
    if band is None:
        return
    if callable(band):
        with np.errstate(all="ignore"):
            lo, hi = band(grid)
    else:
        curves = [c for c in (curve(d, grid) for d in band) if np.all(np.isfinite(c))]
        if len(curves) < 10:
            return
        lo, hi = np.percentile(np.array(curves), [2.5, 97.5], axis=0)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.fill_between(grid[ok], lo[ok], hi[ok], color=color, alpha=0.2, lw=0, label=label)


def _extrapolation(ax, x_used_max: float, x_far: float) -> None:
    """Shade where the curve goes beyond the data it was fitted on."""
    if x_far > x_used_max:
        ax.axvspan(x_used_max, x_far, color="grey", alpha=0.08, lw=0, label="extrapolation")
        ax.axvline(x_used_max, color="grey", ls=":", lw=1)


def _pred_c(pr: dict) -> float:
    return pr["at"]["C"] if "C" in pr["at"] else 6 * pr["N"]["value"] * pr["D"]["value"]


def plot_fit(path: Path, result: dict, cols: dict[str, np.ndarray], runs: np.ndarray, held: list[str], fit: Fit,
             band) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    form, p = fit.form, fit.params
    fig, axes = plt.subplots(1, 2 if form == "chinchilla" else 1, figsize=(11 if form == "chinchilla" else 6.4, 4.6),
                             dpi=120, squeeze=False)
    ax = axes[0, 0]
    held_mask = np.isin(runs, held)
    y = cols.get("y")
    used = ~held_mask
    if form in ("power", "sigmoid"):
        x = cols["x"]
        xs = [v for pr in result["predictions"] for k, v in pr["at"].items()]
        hi_x, lo_x = max([x.max()] + xs), min([x.min()] + xs)
        grid = np.geomspace(lo_x, hi_x, 300) if form == "power" else np.linspace(lo_x, hi_x, 300)
        _band(ax, grid, band, lambda d, g: laws.predict(form, d, {"x": g}), "C0", "95% band")
        ax.plot(grid, laws.predict(form, p, {"x": grid}), color="C0", label=f"fit ({form})")
        _extrapolation(ax, x[used].max(), hi_x)
        if lo_x < x[used].min():
            ax.axvspan(lo_x, x[used].min(), color="grey", alpha=0.08, lw=0)
        if form == "power":
            ax.set_xscale("log")
        xlabel, ylabel = result["columns"]["x"], result["columns"]["y"]
        if form == "sigmoid" and "bounds" in fit.extra:
            for b in fit.extra["bounds"]:
                if np.isfinite(b):
                    ax.axhline(b, color="k", lw=0.6, ls="--")
        for pr in result["predictions"]:
            v, ci = pr["y"]["value"], pr["y"]["ci95"]
            ax.errorbar([pr["x"]["value"]], [v], yerr=None if not ci else [[v - ci[0]], [ci[1] - v]], fmt="D",
                        color="C2", capsize=3, label="prediction")
    elif form == "chinchilla":
        x = 6 * cols["n"] * cols["d"]
        far = max([x.max()] + [_pred_c(pr) for pr in result["predictions"]])
        grid = np.geomspace(x.min(), far * 1.5, 300)
        _band(ax, grid, band, lambda d, g: laws.chinchilla(d, *laws.compute_optimal(d, g)), "C1", "95% band")
        ax.plot(grid, laws.chinchilla(p, *laws.compute_optimal(p, grid)), color="C1", label="compute-optimal frontier")
        _extrapolation(ax, x[used].max(), grid[-1])
        sc = ax.scatter(x[used], y[used], c=np.log10(cols["n"][used]), s=18, cmap="viridis", label="runs used",
                        zorder=3)
        fig.colorbar(sc, ax=ax, label="log10 N")
        for pr in result["predictions"]:
            v, ci = pr["loss"]["value"], pr["loss"]["ci95"]
            ax.errorbar([_pred_c(pr)], [v], fmt="D", color="C2", capsize=3,
                        yerr=None if not ci else [[v - ci[0]], [ci[1] - v]], label="prediction", zorder=4)
        ax.set_xscale("log")
        xlabel, ylabel = "C = 6ND", result["columns"]["y"]
        _contours(fig, axes[0, 1], cols, held_mask, p, result)
    else:  # isoflop: N_opt against C
        x, y = np.array(fit.extra["budgets"]), np.array(fit.extra["n_opt"])
        far = max([x.max()] + [pr["at"]["C"] for pr in result["predictions"] if "C" in pr["at"]])
        grid = np.geomspace(x.min(), far * 1.5, 200)
        _band(ax, grid, band, laws.isoflop_nopt, "C1", "95% band (N_opt)")
        ax.plot(grid, laws.isoflop_nopt(p, grid), color="C1", label=f"N_opt = {p['kN']:.3g} C^{p['aN']:.3f}")
        ax.plot(grid, laws.isoflop_dopt(p, grid), color="C4", ls="--", label=f"D_opt = {p['kD']:.3g} C^{p['aD']:.3f}")
        ax.scatter(x, np.array(fit.extra["d_opt"]), color="C4", s=18, marker="s", label="D_opt per budget")
        _extrapolation(ax, x.max(), grid[-1])
        ax.set_xscale("log")
        ax.set_yscale("log")
        xlabel, ylabel, held_mask = "C", "N_opt, D_opt", np.zeros(len(x), dtype=bool)
        for h in result["holdout"]:
            c = float(h["run"].split("=", 1)[1])
            ax.scatter([c], [h["actual"]], marker="*", s=120, color="C3", label="held-out budget (actual)", zorder=5)
            ax.scatter([c], [h["predicted"]], marker="x", s=60, color="k", label="held-out budget (predicted)",
                       zorder=6)
        for pr in result["predictions"]:
            ax.scatter([pr["at"]["C"]], [pr["N_opt"]["value"]], marker="D", color="C2", label="prediction", zorder=4)
    if form != "chinchilla":
        ax.scatter(x[~held_mask], y[~held_mask], color="C0" if form != "isoflop" else "C1", s=18, zorder=3,
                   label="runs used" if form != "isoflop" else "N_opt per budget")
    if held_mask.any():
        ax.scatter(x[held_mask], y[held_mask], marker="*", s=120, color="C3", label="held out (actual)", zorder=5)
        if len(result["holdout"]) == int(held_mask.sum()):   # same order: the data's, held-out rows only
            ax.scatter(x[held_mask], [h["predicted"] for h in result["holdout"]], marker="x", s=60, color="k",
                       label="held out (predicted)", zorder=6)
    finish(ax, xlabel, ylabel, f"scale-fit: {form}" + (f" ({len(held)} held out)" if held else ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.grid(alpha=0.3, which="both")


def _contours(fig, ax, cols, held_mask, p, result) -> None:
    """Iso-loss contours of the Chinchilla law in (D, N), the runs, and the compute-optimal frontier."""
    n, d = cols["n"], cols["d"]
    far_n = max([n.max()] + [pr["N"]["value"] for pr in result["predictions"]])
    far_d = max([d.max()] + [pr["D"]["value"] for pr in result["predictions"]])
    ng, dg = np.geomspace(n.min() / 2, far_n * 2, 120), np.geomspace(d.min() / 2, far_d * 2, 120)
    nn, dd = np.meshgrid(ng, dg, indexing="ij")
    cs = ax.contour(dd, nn, laws.chinchilla(p, nn, dd), levels=12, cmap="magma", linewidths=0.8)
    ax.clabel(cs, fontsize=6, fmt="%.3g")
    c = np.geomspace(6 * ng[0] * dg[0], 6 * ng[-1] * dg[-1], 200)
    nopt, dopt = laws.compute_optimal(p, c)
    keep = (nopt >= ng[0]) & (nopt <= ng[-1]) & (dopt >= dg[0]) & (dopt <= dg[-1])
    ax.plot(dopt[keep], nopt[keep], color="C1", label="compute-optimal")
    ax.scatter(d[~held_mask], n[~held_mask], color="C0", s=18, label="runs used", zorder=3)
    if held_mask.any():
        ax.scatter(d[held_mask], n[held_mask], marker="*", s=120, color="C3", label="held out", zorder=4)
    for pr in result["predictions"]:
        ax.scatter([pr["D"]["value"]], [pr["N"]["value"]], marker="D", color="C2", label="prediction", zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("iso-loss contours (shaded: beyond the runs used)")
    ax.axvspan(d[~held_mask].max(), dg[-1], color="grey", alpha=0.06, lw=0)
    ax.axhspan(n[~held_mask].max(), ng[-1], color="grey", alpha=0.06, lw=0)
    finish(ax, "D (tokens)", "N (parameters)", "iso-loss contours (shaded: beyond the runs used)")


def plot_curve(path: Path, result: dict, fit) -> None:
    """A forecast: the evaluations (the fitted ones filled), the law over the whole schedule with its 95% band, the
    future shaded, the predictions and the reference's final loss; the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    steps = np.array([d["step"] for d in result["data"]])
    ys = np.array([d["y"] for d in result["data"]])
    first = max(int(fit.t_fit.min() // 2), 1)
    grid = np.unique(np.linspace(first, result["steps"], 300).round().astype(int))
    ax.plot(grid, fit.predict(grid), color="C0", label="multi-power law fit")
    marks = np.unique(np.linspace(fit.observed_step, result["steps"], 5).round().astype(int))
    if result["interval"]["method"] and len(marks) > 1:
        ivs = [fit.interval(int(s)) for s in marks]
        ax.fill_between(marks, [i.lo for i in ivs], [i.hi for i in ivs], color="C0", alpha=0.2, lw=0,
                        label="95% band")
    fitted = np.isin(steps, fit.t_fit)
    ax.scatter(steps[~fitted], ys[~fitted], s=10, facecolors="none", edgecolors="grey", label="evaluations")
    ax.scatter(steps[fitted], ys[fitted], s=12, color="C0", label="evaluations fitted", zorder=3)
    _extrapolation(ax, fit.observed_step, result["steps"])
    for pr in result["predictions"]:
        v, ci = pr["loss"]["value"], pr["loss"]["ci95"]
        ax.errorbar([pr["at"]["step"]], [v], yerr=None if not ci else [[v - ci[0]], [ci[1] - v]], fmt="D",
                    color="C2", capsize=3, label="prediction", zorder=4)
    if "stop" in result:
        ax.axhline(result["stop"]["reference_final"], color="C3", ls="--", lw=1, label="reference final loss")
    lo = min(ys[steps >= first].min() if (steps >= first).any() else ys.min(),
             min(p["loss"]["ci95"][0] if p["loss"]["ci95"] else p["loss"]["value"] for p in result["predictions"]))
    ax.set_ylim(lo - 0.02 * abs(lo), float(np.percentile(ys[steps >= first], 98)) if (steps >= first).any() else None)
    ax2 = ax.twinx()
    ax2.plot(np.arange(1, result["steps"] + 1), fit.schedule.eta * fit.schedule.peak, color="C1", lw=0.8, alpha=0.6)
    ax2.set_ylabel("learning rate", color="C1")
    finish(ax, "step", "validation loss" if result["y"] != "train_loss" else "training loss",
           f"forecast at {100 * result['fraction']:.0f}% of the run")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_downstream(path: Path, result: dict, cols: dict[str, np.ndarray], runs: np.ndarray, held: list[str],
                    parts: dict) -> None:
    """Two panels: step 1, loss against compute (power law); step 2, accuracy against loss (bounded sigmoid); the
    predictions with their propagated intervals, held-out runs marked, extrapolation shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=120)
    f1, f2 = parts["step1"], parts["step2"]
    used = ~np.isin(runs, held)
    far = max([cols["x"].max()] + [p["x"]["value"] for p in result["predictions"]])
    grid = np.geomspace(cols["x"].min(), far, 300)
    a1.plot(grid, laws.power(f1.params, grid), color="C0", label="step 1: L = a C^b + c")
    a1.scatter(cols["x"][used], cols["v"][used], s=18, color="C0", label="runs used", zorder=3)
    _extrapolation(a1, cols["x"][used].max(), far)
    lgrid = np.linspace(min([cols["v"].min()] + parts["losses"]), cols["v"].max(), 300)
    a2.plot(lgrid, laws.sigmoid(f2.params, lgrid), color="C1", label="step 2: bounded sigmoid")
    a2.scatter(cols["v"][used], cols["y"][used], s=18, color="C1", label="runs used", zorder=3)
    for b in result["bounds"]:
        if np.isfinite(b):
            a2.axhline(b, color="k", lw=0.6, ls="--")
    lo_used = cols["v"][used].min()
    if lgrid[0] < lo_used:
        a2.axvspan(lgrid[0], lo_used, color="grey", alpha=0.08, lw=0, label="extrapolation")
    for ax, xs, ys in ((a1, cols["x"], cols["v"]), (a2, cols["v"], cols["y"])):
        if (~used).any():
            ax.scatter(xs[~used], ys[~used], marker="*", s=120, color="C3", label="held out (actual)", zorder=5)
    for pr in result["predictions"]:
        for ax, xv, q in ((a1, pr["x"]["value"], pr["loss"]), (a2, pr["loss"]["value"], pr["y"])):
            ci = q["ci95"]
            ax.errorbar([xv], [q["value"]], yerr=None if not ci else [[q["value"] - ci[0]], [ci[1] - q["value"]]],
                        fmt="D", color="C2", capsize=3, label="prediction", zorder=4)
    a1.set_xscale("log")
    finish(a1, result["columns"]["x"], result["columns"]["v"], "step 1: loss against compute")
    finish(a2, result["columns"]["v"], result["columns"]["y"], "step 2: accuracy against loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
