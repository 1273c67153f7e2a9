"""`scale-fit --form curve`: forecast a gentool run's loss at a later step (its final loss by default) from the part
that exists, with the learning-rate schedule from the run's recipe (curve.py has the law); --follow re-reads a
growing metrics.jsonl, and --stop-if-worse-than REF exits with STOP_EXIT as soon as the forecast is worse than REF's
actual final loss at level alpha."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gentool import console
from gentool.artifacts import check_output, create_artifact, input_ref
from gentool.errors import GentoolError, UsageProblem
from gentool.scaling.curve import CurveFit, Schedule, fit_curve

STOP_EXIT = 3   # the exit status when the forecast is worse than the reference (documented in --help and man)
MEANING = ("95% profile-likelihood interval of the penalised least-squares fit of the multi-power law (Luo et al. "
           "2025), widened for correlated residuals; before the learning rate decays, the annealing drop comes from "
           "a prior (B ~ 5% of the loss), which the interval includes")


@dataclass
class ForecastOptions:
    input: str
    y: str = "loss"                  # loss / val_loss: the evaluations; train_loss: every logged step
    predict: list[str] = field(default_factory=list)   # step=FINAL, step=N
    follow: bool = False
    poll: float = 30.0
    stop_if_worse_than: str | None = None
    alpha: float = 0.05
    intervals: bool = True


def _run_dir(path: Path) -> Path:
    """The run directory of RUN, RUN/metrics.jsonl, RUN.partial, or RUN while only RUN.partial exists yet."""
    if path.name == "metrics.jsonl":
        path = path.parent
    if path.is_dir():
        return path
    partial = path.with_name(path.name + ".partial")
    if partial.is_dir():
        return partial
    if path.name.endswith(".partial") and path.with_name(path.name[: -len(".partial")]).is_dir():
        return path.with_name(path.name[: -len(".partial")])   # it finished while we were away
    raise UsageProblem("no such run directory (or RUN.partial)", path=path)


def _recipe(run: Path) -> dict[str, Any]:
    for name, key in (("manifest.json", "config"), ("run.json", None)):
        f = run / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise GentoolError(f"cannot read {name} ({e})", path=run) from None
            data = data.get(key, {}) if key else data
            if isinstance(data, dict) and isinstance(data.get("train"), dict):
                return data["train"]
    raise UsageProblem("no recipe (manifest.json or run.json with a train section) next to metrics.jsonl: the "
                       "future learning rates are unknown", path=run, hint="forecast gentool train-lm runs")


def schedule_of(train: dict[str, Any]) -> Schedule:
    from gentool.train.schedules import lr_at

    try:
        steps, lr, warmup = int(train["steps"]), float(train["lr"]), int(train.get("warmup", 0))
        cooldown = float(train.get("cooldown", 0.2))   # the recipe leaves WSD's decay fraction out at its default
        eta = np.array([lr_at(i, total=steps, lr=lr, warmup=warmup, schedule=train.get("schedule", "cosine"),
                              min_ratio=float(train.get("min_lr_ratio", 0.1)), decay_fraction=cooldown)
                        for i in range(steps)])
    except (KeyError, TypeError, ValueError) as e:
        raise GentoolError(f"the run's recipe has no usable schedule ({e})") from None
    return Schedule(eta / lr, warmup, lr)


def read_curve(run: Path, y: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(steps, losses, lines) of metrics.jsonl; a torn last line (a run writing) is ignored."""
    f = run / "metrics.jsonl"
    if not f.is_file():
        return np.zeros(0, int), np.zeros(0), []
    lines = []
    for raw in f.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            lines.append(rec)
    key = "loss" if y == "train_loss" else "val_loss"
    pts = [(r["step"], r[key]) for r in lines if isinstance(r.get("step"), int) and isinstance(r.get(key), (int, float))
           and math.isfinite(r[key])]
    return np.array([p[0] for p in pts], int), np.array([p[1] for p in pts], float), lines


def reference_final(ref: str, y: str) -> float:
    """REF's actual final loss (its manifest's, else its last evaluation), or a number given directly."""
    try:
        return float(ref)
    except ValueError:
        pass
    run = _run_dir(Path(ref))
    if (run / "manifest.json").is_file():
        metrics = json.loads((run / "manifest.json").read_text()).get("metrics", {})
        v = metrics.get("train_loss" if y == "train_loss" else "val_loss")
        if isinstance(v, (int, float)):
            return float(v)
    t, yy, _ = read_curve(run, y)
    if not len(t):
        raise UsageProblem("the reference run has no final loss yet", path=ref, hint="give a finished run")
    return float(yy[np.argmax(t)])


def _targets(predict: list[str], total: int) -> list[int]:
    out = []
    for item in predict or ["step=FINAL"]:
        key, _, value = item.partition("=")
        if key.strip().lower() != "step":
            raise UsageProblem(f"bad --predict {item!r} for --form curve", hint="use step=FINAL or step=N")
        v = value.strip()
        try:
            step = total if v.upper() == "FINAL" else int(float(v))
        except ValueError:
            raise UsageProblem(f"bad --predict {item!r}", hint="use step=FINAL or step=N") from None
        if not 1 <= step <= total:
            raise UsageProblem(f"--predict step={step} is outside the run's schedule (1..{total})")
        out.append(step)
    return out


def forecast_once(opts: ForecastOptions, ref_final: float | None = None) -> tuple[dict[str, Any], CurveFit]:
    run = _run_dir(Path(opts.input))
    schedule = schedule_of(_recipe(run))
    t, y, lines = read_curve(run, opts.y)
    targets = _targets(opts.predict, schedule.steps)
    fit = fit_curve(schedule, t, y)
    logged = {r["step"]: r.get("lr") for r in lines if isinstance(r.get("step"), int)}
    bad = [s for s, lr in logged.items() if isinstance(lr, (int, float)) and 1 <= s <= schedule.steps
           and abs(lr - schedule.eta[s - 1] * schedule.peak) > 1e-6 * schedule.peak]
    if bad:
        fit.warnings.append(f"the logged learning rate differs from the recipe's schedule at {len(bad)} steps "
                            f"(first: step {bad[0]}): the forecast assumes the recipe's")
    preds = []
    for step in targets:
        value = float(fit.predict(np.array([step]))[0])
        entry: dict[str, Any] = {"value": value, "ci95": None}
        if opts.intervals:
            entry.update(fit.interval(step).as_dict())
        preds.append({"at": {"step": step}, "loss": entry})
    result: dict[str, Any] = {
        "form": "curve", "run": str(run), "y": opts.y, "observed_step": fit.observed_step, "steps": schedule.steps,
        "fraction": fit.observed_step / schedule.steps, "finished": (run / "manifest.json").is_file(),
        "params": {k: {"value": v, "ci95": None} for k, v in fit.params.items()},
        "predictions": preds, "n_points": len(fit.t_fit), "fit_steps": [int(fit.t_fit.min()), int(fit.t_fit.max())],
        "rmse": fit.rmse, "noise": fit.noise, "warnings": fit.warnings,
        "schedule": {"peak_lr": schedule.peak, "warmup": schedule.warmup, "final_lr_ratio": float(schedule.eta[-1])},
        "interval": {"level": 0.95, "method": "profile likelihood" if opts.intervals else None, "meaning": MEANING},
        "data": [{"step": int(a), "y": float(b)} for a, b in zip(t, y)]}
    if ref_final is not None:
        final = schedule.steps
        one_sided = fit.interval(final, level=1 - 2 * opts.alpha)
        predicted = float(fit.predict(np.array([final]))[0])
        result["stop"] = {"reference": opts.stop_if_worse_than, "reference_final": ref_final, "alpha": opts.alpha,
                          "predicted_final": predicted, "lower_bound": one_sided.lo,
                          "worse": bool(one_sided.lo > ref_final)}
    return result, fit


def run_forecast(opts: ForecastOptions, out: Path | None = None, *, force: bool = False) -> dict[str, Any]:
    """One forecast, or with follow one per new evaluation until the run ends or the stop rule fires."""
    if not 0 < opts.alpha < 0.5:
        raise UsageProblem("--alpha must be in (0, 0.5)")
    if out is not None:
        check_output(out, force=force)
    ref = reference_final(opts.stop_if_worse_than, opts.y) if opts.stop_if_worse_than else None
    seen = -1
    while True:
        try:
            run = _run_dir(Path(opts.input))
        except UsageProblem:
            if not opts.follow:
                raise
            if seen == -1:
                console.log(f"{opts.input}: no run directory yet; waiting for it")
                seen = -2
            time.sleep(opts.poll)
            continue
        t, _, _ = read_curve(run, opts.y)
        latest = int(t.max()) if len(t) else 0
        if latest != seen:
            seen = latest
            try:
                result, fit = forecast_once(opts, ref)
            except GentoolError as e:
                if not opts.follow or isinstance(e, UsageProblem):
                    raise
                console.log(f"step {latest}: {e.message}; waiting")
                result = None
            if result is not None:
                p = result["predictions"][-1]["loss"]
                ci = p.get("ci95")
                console.log(f"step {result['observed_step']}/{result['steps']} ({100 * result['fraction']:.0f}%): "
                            f"predicted loss at step {result['predictions'][-1]['at']['step']} {p['value']:.4f}"
                            + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
                            + (f"; reference {ref:.4f}" if ref is not None else ""))
                stop = result.get("stop", {}).get("worse", False)
                if not opts.follow or stop or result["observed_step"] >= result["steps"]:
                    for w in fit.warnings:
                        console.warn(w)
                    if out is not None:
                        _write(out, opts, result, fit, force)
                    return result
        if not opts.follow:
            raise GentoolError("no evaluations logged yet", path=run)
        time.sleep(opts.poll)


def _write(out: Path, opts: ForecastOptions, result: dict, fit: CurveFit, force: bool) -> None:
    metrics = Path(result["run"]) / "metrics.jsonl"
    config = {"law": "curve (multi-power law, Luo et al. 2025)", "y": opts.y, "predict": opts.predict,
              "stop_if_worse_than": opts.stop_if_worse_than, "alpha": opts.alpha}
    with create_artifact(out, "scale-fit", force=force, config=config,
                         inputs=[input_ref("metrics", metrics)]) as art:
        (art.dir / "fit.json").write_text(json.dumps(json.loads(console.dumps(result)), indent=2) + "\n")
        with open(art.dir / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kind", "at", "quantity", "value", "ci_low", "ci_high"])
            for p in result["predictions"]:
                lo, hi = p["loss"]["ci95"] or ("", "")
                w.writerow(["predict", json.dumps(p["at"]), "loss", p["loss"]["value"], lo, hi])
        try:
            from gentool.scaling.plot import plot_curve

            plot_curve(art.dir / "plot.png", result, fit)
        except ImportError:
            console.warn("matplotlib is not installed: no plot.png (pip install 'gentool[plot]' to get one)")
        art.contents.update(form="curve", params={k: v["value"] for k, v in result["params"].items()},
                            observed_step=result["observed_step"], steps=result["steps"])
        art.metrics.update(predicted_final=result["predictions"][-1]["loss"]["value"], rmse=result["rmse"])
