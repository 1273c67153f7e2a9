"""`gentool scale-fit` end to end: read points, hold out the largest runs, fit, intervals, predict, write.
--form curve is forecast.py's (one run's learning curve), --form downstream is downstream.py's two-step fit."""

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
from gentool.scaling import downstream, laws
from gentool.scaling.ci import METHOD, law_intervals
from gentool.scaling.fit import Fit, budgets, fit_form, holdout_errors, holdout_summary, isoflop_vertex, largest_runs
from gentool.scaling.io import read_table

DEFAULT_COLUMNS = {"x": "C", "y": "loss", "n": "N", "d": "D", "c": "C", "v": "loss"}
INTERVAL_MEANING = {
    "power": "95% profile-likelihood interval: the values not rejected by an F test of the least-squares fit at 5%, "
             "assuming the law holds and the points have independent errors of similar relative size",
    "sigmoid": "95% profile-likelihood interval: the values not rejected by an F test of the least-squares fit at "
               "5%, assuming the law holds and the points have independent errors of similar size",
    "chinchilla": "95% percentile bootstrap interval over runs: the 2.5-97.5% range of refits on runs resampled "
                  "with replacement (an end on a parameter bound is flagged open)",
    "isoflop": "95% Student-t interval of the log N_opt - log C regression over the budgets (needs 3 or more)",
    "downstream": downstream.MEANING}


@dataclass
class StudyOptions:
    inputs: list[str]
    form: str = "power"
    columns: dict[str, str] = field(default_factory=dict)   # role (x, y, n, d, c) -> column name
    point: str = "final"
    filters: list[str] = field(default_factory=list)
    strict: bool = False
    bootstrap: int = 200
    holdout: int = 0
    predict: list[str] = field(default_factory=list)
    seed: int = 0
    keep_duplicates: bool = False
    best_of: str | None = None
    skip: float = 0.0
    smooth: int = 1
    bounds: tuple[float, float] | None = None   # sigmoid floor and ceiling
    follow: bool = False                        # --form curve: forecast.ForecastOptions
    poll: float = 30.0
    stop_if_worse_than: str | None = None
    alpha: float = 0.05


def parse_predict(items: list[str]) -> list[dict[str, float]]:
    """'C=1e21' / 'N=1e9,D=2e10' / 'X=3' -> {'C': 1e21} ..."""
    out = []
    for item in items:
        point = {}
        for part in item.split(","):
            key, sep, value = part.partition("=")
            try:
                v = float(value)
            except ValueError:
                sep = ""
            if not sep or key.strip().upper() not in ("C", "N", "D", "X") or not math.isfinite(v):
                raise UsageProblem(f"bad --predict {item!r}", hint="use C=1e21, N=1e9,D=2e10 or X=...")
            point[key.strip().upper()] = v
        out.append(point)
    return out


def prediction(form: str, p: dict[str, float], at: dict[str, float]) -> dict[str, float]:
    """The law's prediction at one --predict point (Chinchilla at C: on the compute-optimal frontier)."""
    if form == "chinchilla":
        if "N" in at and "D" in at:
            n, d = at["N"], at["D"]
        elif "C" in at:
            n, d = (float(v[0]) for v in laws.compute_optimal(p, np.array([at["C"]])))
        else:
            raise UsageProblem("chinchilla predictions need N=..,D=.. or C=..", hint="e.g. --predict C=1e21")
        return {"N": n, "D": d, "loss": float(laws.chinchilla(p, np.array(n), np.array(d)))}
    if form == "isoflop":
        if "C" not in at:
            raise UsageProblem("isoflop predictions need C=..", hint="e.g. --predict C=1e21")
        c = np.array(at["C"])
        return {"N_opt": float(laws.isoflop_nopt(p, c)), "D_opt": float(laws.isoflop_dopt(p, c))}
    if len(at) != 1:
        raise UsageProblem(f"{form} predictions take one value of X", hint="e.g. --predict X=1e21 or C=1e21")
    (x,) = at.values()
    return {"x": x, "y": float(laws.predict(form, p, {"x": np.array(x)}))}


def _check_points(form: str, n_points: int, n_runs: int, holdout: int) -> None:
    need = laws.MIN_POINTS[form]
    if n_points < need or n_runs < 2:
        raise UsageProblem(f"the {form} form needs at least {need} points from 2 or more runs"
                           + (f" besides the {holdout} held-out runs" if holdout else "")
                           + f"; got {n_points} usable points from {n_runs} runs",
                           hint="add runs, lower --holdout, or check the column mapping (--x/--y/--n/--d/--c)")


def canonical(points: list) -> tuple[list, np.ndarray]:
    """Points in an order that depends on their values only, and run ids ranked by their points' values (so the
    bootstrap, which draws runs in id order, never depends on the row order of the inputs)."""
    by_run: dict[str, list] = {}
    for p in sorted(points, key=lambda p: (p.key(), p.run)):
        by_run.setdefault(p.run, []).append(p)
    order = sorted(by_run, key=lambda r: ([p.key() for p in by_run[r]], r))
    pts = [p for r in order for p in by_run[r]]
    return pts, np.array([p.run for p in pts])


def _report_notes(notes: dict[str, Any]) -> None:
    for how in notes.get("derived", []):
        console.log(f"derived {how} (the input has no such column)")
    if notes.get("duplicates"):
        kept = notes.get("duplicates_kept")
        example = notes.get("duplicate_example", "inputs given twice")
        console.warn(f"{notes['duplicates']} exact duplicate rows ({example})"
                     + ("; kept (--keep-duplicates): they count as independent runs" if kept
                        else "; dropped (--keep-duplicates keeps them)"))
    if notes.get("best_of_dropped"):
        console.log(f"--best-of: dropped {notes['best_of_dropped']} points of worse sweep settings")


def run_study(opts: StudyOptions, out: Path | None = None, *, force: bool = False) -> dict[str, Any]:
    if opts.form not in laws.FORMS:
        raise UsageProblem(f"unknown --form {opts.form!r}", hint="use " + ", ".join(laws.FORMS))
    if opts.bootstrap < 0 or opts.holdout < 0:
        raise UsageProblem("--bootstrap and --holdout must be >= 0")
    if opts.form == "curve":
        from gentool.scaling.forecast import ForecastOptions, run_forecast

        if len(opts.inputs) != 1:
            raise UsageProblem("--form curve forecasts one run", hint="give RUN or RUN/metrics.jsonl")
        if opts.holdout:
            raise UsageProblem("--holdout does not apply to --form curve", hint="cut the run with --predict step=N")
        return run_forecast(ForecastOptions(opts.inputs[0], y=opts.columns.get("y", "loss"), predict=opts.predict,
                                            follow=opts.follow, poll=opts.poll,
                                            stop_if_worse_than=opts.stop_if_worse_than, alpha=opts.alpha,
                                            intervals=opts.bootstrap > 0), out, force=force)
    if opts.follow or opts.stop_if_worse_than:
        raise UsageProblem("--follow and --stop-if-worse-than forecast one run", hint="add --form curve")
    if out is not None:
        check_output(out, force=force)
    cols_map = {r: opts.columns.get(r) or ("acc" if opts.form == "downstream" and r == "y" else DEFAULT_COLUMNS[r])
                for r in laws.ROLES[opts.form]}
    at_points = parse_predict(opts.predict)
    table = read_table(opts.inputs, cols_map, point=opts.point, filters=opts.filters,
                       positive=laws.POSITIVE[opts.form], keep_duplicates=opts.keep_duplicates, best_of=opts.best_of,
                       skip=opts.skip, smooth=opts.smooth,
                       best="max" if opts.form in ("sigmoid", "downstream") else "min")
    for line in table.skipped:
        console.warn(f"skipped {line}")
    _report_notes(table.notes)
    if table.skipped and opts.strict:
        raise GentoolError(f"{len(table.skipped)} malformed rows (first: {table.skipped[0]})",
                           hint="fix them, or drop --strict to skip them")
    _check_points(opts.form, len(table.points), len({p.run for p in table.points}), 0)
    points, runs = canonical(table.points)
    cols = {r: np.array([p.values[r] for p in points]) for r in laws.ROLES[opts.form]}
    size = cols["c"] if "c" in cols else cols["x"] if "x" in cols else 6 * cols["n"] * cols["d"]
    if opts.form == "isoflop" and opts.holdout:   # hold out whole budgets, the largest
        groups = budgets(cols["c"])
        runs_by_budget = [sorted(set(runs[g])) for g in groups]
        held = [r for g in runs_by_budget[::-1][: opts.holdout] for r in g]
    else:
        held = largest_runs(runs, size, opts.holdout) if opts.holdout else []
    train = ~np.isin(runs, held)
    train_cols = {r: v[train] for r, v in cols.items()}
    _check_points(opts.form, int(train.sum()), len(set(runs[train])), opts.holdout)
    common = {"n_points": int(train.sum()), "n_runs": len(set(runs[train])), "n_holdout": len(held),
              "skipped": len(table.skipped), "notes": table.notes, "columns": cols_map, "point": opts.point,
              "sources": table.sources,
              "interval": {"level": 0.95, "method": METHOD.get(opts.form, "two-step propagation")
                           if opts.bootstrap else None,
                           "meaning": INTERVAL_MEANING[opts.form] if opts.bootstrap else "no intervals (--bootstrap 0)",
                           **({"resamples": opts.bootstrap, "seed": opts.seed} if opts.form == "chinchilla" else {})}}
    if opts.form == "downstream":
        result, parts = downstream.downstream_result(cols, runs, train, at_points, opts.bounds, opts.bootstrap > 0)
        result = {"form": "downstream", **common, **{k: v for k, v in result.items() if k != "form"}}
        if out is not None:
            _write(out, opts, result, cols, runs, held, parts, None, force)
        return result
    fit = fit_form(opts.form, train_cols, bounds=opts.bounds)
    for w in fit.warnings:
        console.warn(w)

    def derive(f: Fit) -> dict[str, float]:
        d = laws.derived(f.form, f.params)
        for i, at in enumerate(at_points):
            d.update({f"predict{i}.{k}": v for k, v in prediction(f.form, f.params, at).items()})
        return d

    ivs, band = law_intervals(opts.form, train_cols, runs[train], fit, at_points, opts.bootstrap, opts.seed,
                              derive) if opts.bootstrap else ({}, None)
    values = derive(fit)

    def entry(name: str, v: float, given: bool = False) -> dict[str, Any]:
        iv = None if given else ivs.get(name)
        return {"value": v, "ci95": None} if iv is None else {"value": v, **iv.as_dict()}

    params = {k: entry(k, v) for k, v in {**fit.params, **values}.items() if not k.startswith("predict")}
    preds = [{"at": at, **{k: entry(f"predict{i}.{k}", values[f"predict{i}.{k}"], k == "x" or k in at)
                           for k in prediction(opts.form, fit.params, at)}} for i, at in enumerate(at_points)]
    for name, iv in ivs.items():
        if iv.open_lo or iv.open_hi:
            fit.warnings.append(f"the 95% interval of {name} reaches "
                                + (f"a bound in {iv.bound_hits} bootstrap resamples" if iv.bound_hits
                                   else "a parameter bound") + ": its "
                                + " and ".join(e for e, o in (("lower", iv.open_lo), ("upper", iv.open_hi)) if o)
                                + " end is not determined by the data")
            console.warn(fit.warnings[-1])   # and in the result's warnings, as the fit's own are
    data = [{"run": p.run, **p.values, "held_out": bool(h)} for p, h in zip(points, ~train)]
    residuals = None
    if opts.form != "isoflop":
        fitted = laws.predict(opts.form, fit.params, cols)
        for row, f_ in zip(data, fitted):
            row["fitted"], row["residual"] = float(f_), float(row["y"] - f_)
        residuals = (cols["y"] - fitted)[train]
    holdout = []
    if held and opts.form == "isoflop":
        for g in budgets(cols["c"][~train]):
            idx = np.flatnonzero(~train)[g]
            actual = isoflop_vertex(cols["n"][idx], cols["y"][idx])
            budget = float(np.exp(np.mean(np.log(cols["c"][idx]))))
            if actual is None:
                console.warn(f"the held-out budget C={budget:.3g} has no convex isoFLOP curve to compare with")
                continue
            holdout += holdout_errors(np.array([f"C={budget:.4g}"]), np.array([actual]),
                                      np.array([float(laws.isoflop_nopt(fit.params, budget))]))
            holdout[-1]["quantity"] = "N_opt"
    elif held:
        holdout = holdout_errors(runs[~train], cols["y"][~train], fitted[~train])
    result = {"form": opts.form, **common, "params": params, "fit_loss": fit.loss, "converged": fit.converged,
              "warnings": fit.warnings, "predictions": preds, "holdout": holdout,
              "holdout_summary": holdout_summary(holdout),
              "rmse": float(np.sqrt(np.mean(residuals**2))) if residuals is not None else None,
              "max_abs_residual": float(np.abs(residuals).max()) if residuals is not None else None,
              "data": data,
              **({"isoflop": fit.extra} if fit.extra else {})}
    if not math.isfinite(fit.loss):
        raise GentoolError("the fit's loss is not finite", hint="check the data for extreme values")
    if out is not None:
        _write(out, opts, result, cols, runs, held, fit, band, force)
    return result


def _write(out: Path, opts: StudyOptions, result: dict, cols, runs, held, fit: Fit, band, force: bool) -> None:
    inputs = [input_ref("run" if s["kind"] == "run" else "table", s["path"]) if s["path"] != "-" else
              {"role": "table", "path": "-"} for s in result["sources"]]
    config = {"law": opts.form, "columns": result["columns"], "point": opts.point, "filters": opts.filters,
              "objective": f"huber(delta={laws.HUBER_DELTA}) on log L, L-BFGS-B" if opts.form == "chinchilla"
              else {"power": "least squares on relative residuals", "isoflop": "parabolas in log N, log-log fits",
                    "sigmoid": "bounded least squares", "downstream": "power law L(C), then bounded sigmoid acc(L)"
                    }[opts.form],
              "bootstrap": opts.bootstrap, "holdout": opts.holdout, "seed": opts.seed}
    with create_artifact(out, "scale-fit", force=force, config=config, inputs=inputs) as art:
        (art.dir / "fit.json").write_text(json.dumps(json.loads(console.dumps(result)), indent=2) + "\n")
        with open(art.dir / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kind", "at", "quantity", "value", "ci_low", "ci_high", "actual", "abs_err", "rel_err"])
            for p in result["predictions"]:
                for k, v in p.items():
                    if k != "at":
                        lo, hi = v["ci95"] or ("", "")
                        w.writerow(["predict", json.dumps(p["at"]), k, v["value"], lo, hi, "", "", ""])
            for h in result["holdout"]:
                w.writerow(["holdout", h["run"], "y", h["predicted"], "", "", h["actual"], h["abs_err"], h["rel_err"]])
        try:
            from gentool.scaling.plot import plot_downstream, plot_fit

            if opts.form == "downstream":
                plot_downstream(art.dir / "plot.png", result, cols, runs, held, fit)
            else:
                plot_fit(art.dir / "plot.png", result, cols, runs, held, fit, band)
        except ImportError:
            console.warn("matplotlib is not installed: no plot.png (pip install 'gentool[plot]' to get one)")
        art.contents.update(form=opts.form, params={k: v["value"] for k, v in result["params"].items()},
                            n_points=result["n_points"], n_holdout=result["n_holdout"])
        art.metrics.update(fit_loss=result["fit_loss"], rmse=result["rmse"], holdout_summary=result["holdout_summary"],
                           holdout_rel_err=[h["rel_err"] for h in result["holdout"]])
