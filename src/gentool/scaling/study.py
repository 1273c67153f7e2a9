"""`gentool scale-fit`: read points, fit, bootstrap, hold out the largest runs, predict, write the artifact."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gentool import console
from gentool.artifacts import check_output, create_artifact, input_ref
from gentool.errors import GentoolError, UsageProblem
from gentool.scaling.fit import MIN_POINTS, Fit, bootstrap, compute_optimal, fit_form, predict
from gentool.scaling.io import read_table

ROLES = {"power": ("x", "y"), "chinchilla": ("n", "d", "y"), "isoflop": ("n", "c", "y"), "sigmoid": ("x", "y")}
POSITIVE = {"power": ("x", "y"), "chinchilla": ("n", "d", "y"), "isoflop": ("n", "c", "y"), "sigmoid": ()}


@dataclass
class StudyOptions:
    inputs: list[str]
    form: str = "power"
    columns: dict[str, str] = field(default_factory=dict)   # role -> column name
    point: str = "final"
    filters: list[str] = field(default_factory=list)
    strict: bool = False
    bootstrap: int = 200
    holdout: int = 0
    predict: list[str] = field(default_factory=list)
    seed: int = 0


def _columns(opts: StudyOptions) -> dict[str, str]:
    default = {"x": "C", "y": "loss", "n": "N", "d": "D", "c": "C"}
    return {r: opts.columns.get(r) or default[r] for r in ROLES[opts.form]}


def _parse_predict(items: list[str]) -> list[dict[str, float]]:
    out = []
    for item in items:
        point = {}
        for part in item.split(","):
            key, sep, value = part.partition("=")
            try:
                point[key.strip().upper()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise UsageProblem(f"bad --predict {item!r}", hint="use C=1e21, N=1e9,D=2e10 or X=...")
        out.append(point)
    return out


def _prediction_values(fit: Fit, point: dict[str, float]) -> dict[str, float]:
    p = fit.params
    if fit.form == "chinchilla":
        if "N" in point and "D" in point:
            n, d = np.array([point["N"]]), np.array([point["D"]])
        elif "C" in point:
            n, d = compute_optimal(p, np.array([point["C"]]))
        else:
            raise UsageProblem("chinchilla predictions need N and D, or C")
        y = predict(fit, {"n": n, "d": d})
        return {"N": float(n[0]), "D": float(d[0]), "loss": float(y[0])}
    if fit.form == "isoflop":
        if "C" not in point:
            raise UsageProblem("isoflop predictions need C")
        nopt = p["k"] * point["C"] ** p["m"]
        return {"N_opt": nopt, "D_opt": point["C"] / (6 * nopt)}
    x = point.get("X", point.get("C", point.get("N", point.get("D"))))
    if x is None:
        raise UsageProblem(f"{fit.form} predictions need X (or C)")
    return {"x": x, "y": float(predict(fit, {"x": np.array([x])})[0])}


def run_study(opts: StudyOptions, out: Path | None = None, *, force: bool = False) -> dict[str, Any]:
    if opts.form not in ROLES:
        raise UsageProblem(f"unknown --form {opts.form!r}", hint="use power, chinchilla, isoflop or sigmoid")
    if out is not None:
        check_output(out, force=force)
    cols_map = _columns(opts)
    predictions_in = _parse_predict(opts.predict)
    table = read_table(opts.inputs, cols_map, point=opts.point, filters=opts.filters,
                       positive=POSITIVE[opts.form])
    for line in table.skipped:
        console.warn(f"skipped {line}")
    if table.skipped and opts.strict:
        raise GentoolError(f"{len(table.skipped)} malformed rows (first: {table.skipped[0]})",
                           hint="fix them or drop --strict to skip them")
    if table.skipped:
        console.log(f"skipped {len(table.skipped)} rows")
    need = MIN_POINTS[opts.form] + opts.holdout
    if len(table.points) < need:
        raise UsageProblem(f"{opts.form} needs at least {MIN_POINTS[opts.form]} points"
                           + (f" plus {opts.holdout} held out" if opts.holdout else "")
                           + f"; got {len(table.points)} usable", hint="add runs or check the column mapping")
    order = sorted(range(len(table.points)), key=lambda i: (table.points[i].run, sorted(table.points[i].values.items())))
    points = [table.points[i] for i in order]  # row order never changes the result
    cols = {r: np.array([p.values[r] for p in points]) for r in ROLES[opts.form]}
    runs = np.array([p.run for p in points])
    size = cols["c"] if "c" in cols else cols["x"] if "x" in cols else cols["n"] * cols["d"]  # "largest run" order
    held_runs: list[str] = []
    if opts.holdout:
        run_size = {r: float(size[runs == r].max()) for r in np.unique(runs)}
        held_runs = sorted(run_size, key=run_size.get, reverse=True)[: opts.holdout]
        if len(run_size) - len(held_runs) < 2:
            raise UsageProblem("--holdout leaves too few runs to fit")
    train_mask = ~np.isin(runs, held_runs)
    train_cols = {r: v[train_mask] for r, v in cols.items()}
    fit = fit_form(opts.form, train_cols)
    for w in fit.warnings:
        console.warn(w)
    fitted = predict(fit, train_cols) if opts.form != "isoflop" else None
    residuals = (train_cols["y"] - fitted) if fitted is not None else None

    def derive(f: Fit) -> dict[str, float]:
        out_: dict[str, float] = {}
        for i, pt in enumerate(predictions_in):
            for k, v in _prediction_values(f, pt).items():
                out_[f"predict{i}.{k}"] = v
        if f.form == "chinchilla":
            out_["a"] = f.params["beta"] / (f.params["alpha"] + f.params["beta"])
            out_["b"] = f.params["alpha"] / (f.params["alpha"] + f.params["beta"])
        return out_

    ci = bootstrap(opts.form, train_cols, runs[train_mask], fit, opts.bootstrap, opts.seed, derive) \
        if opts.bootstrap else {}
    derived = derive(fit)
    params = {k: {"value": v, "ci95": ci.get(k)} for k, v in {**fit.params, **derived}.items()
              if not k.startswith("predict")}
    preds = []
    for i, pt in enumerate(predictions_in):
        vals = _prediction_values(fit, pt)
        preds.append({"at": pt, **{k: {"value": v, "ci95": ci.get(f"predict{i}.{k}")} for k, v in vals.items()}})
    holdout = []
    if held_runs:
        mask = np.isin(runs, held_runs)
        if opts.form == "isoflop":
            console.warn("--holdout is not defined for isoflop fits (they predict N_opt, not loss)")
        else:
            pred = predict(fit, {r: v[mask] for r, v in cols.items()})
            for run, actual, p_ in zip(runs[mask], cols["y"][mask], pred):
                holdout.append({"run": str(run), "predicted": float(p_), "actual": float(actual),
                                "abs_err": float(abs(p_ - actual)), "rel_err": float(abs(p_ - actual) / abs(actual))})
    result = {"form": opts.form, "n_points": int(train_mask.sum()), "n_runs": int(len(np.unique(runs[train_mask]))),
              "n_holdout": len(held_runs), "skipped": len(table.skipped), "params": params, "fit_loss": fit.loss,
              "converged": fit.converged, "warnings": fit.warnings, "predictions": preds, "holdout": holdout,
              "rmse": float(np.sqrt(np.mean(residuals**2))) if residuals is not None else None,
              "columns": cols_map, "point": opts.point, **({"isoflop": fit.extra} if fit.extra else {})}
    if out is not None:
        _write(out, opts, result, table, cols, runs, held_runs, fit, force)
    return result


def _write(out: Path, opts: StudyOptions, result: dict, table, cols, runs, held_runs, fit: Fit, force: bool) -> None:
    inputs = [input_ref("run" if s["kind"] == "run" else "table", s["path"]) if s["path"] != "-" else
              {"role": "table", "path": "-"} for s in table.sources]
    config = {"law": opts.form, "columns": result["columns"], "point": opts.point, "filters": opts.filters,
              "loss": {"huber_delta": 1e-3} if opts.form == "chinchilla" else "relative least squares",
              "bootstrap": opts.bootstrap, "holdout": opts.holdout, "seed": opts.seed}
    with create_artifact(out, "scale-fit", force=force, config=config, inputs=inputs) as art:
        (art.dir / "fit.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        with open(art.dir / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kind", "at", "quantity", "value", "ci_low", "ci_high"])
            for p in result["predictions"]:
                for k, v in p.items():
                    if k != "at":
                        lo, hi = v["ci95"] or (None, None)
                        w.writerow(["predict", json.dumps(p["at"]), k, v["value"], lo, hi])
            for h in result["holdout"]:
                w.writerow(["holdout", h["run"], "loss", h["predicted"], None, None])
        try:
            from gentool.scaling.plot import plot_fit

            plot_fit(art.dir / "plot.png", result, cols, runs, held_runs, fit)
        except ImportError:
            console.warn("matplotlib is not installed: no plot.png (pip install 'gentool[plot]')")
        art.contents.update(params=result["params"], n_points=result["n_points"], n_holdout=result["n_holdout"])
        if opts.form == "chinchilla":
            p = fit.params
            art.contents["compute_optimal"] = {"N_opt(C)": {"exp": result["params"]["a"]["value"]},
                                               "D_opt(C)": {"exp": result["params"]["b"]["value"]}}
        art.metrics.update(rmse=result["rmse"], holdout_abs_rel_err=[h["rel_err"] for h in result["holdout"]])
        if not math.isfinite(result["fit_loss"]):
            raise GentoolError("the fit's loss is not finite", hint="check the data")
