"""`gentool scale-fit`: fit scaling laws to run logs with honest intervals, or forecast a run before it ends."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import Force, Json, Seed, examples

COLS, CLEAN, CURVE = "Columns", "Input cleaning", "Forecast (--form curve)"


def _opt(help_: str, panel: str | None = None, *names: str, min=None, max=None):
    return typer.Option(*names, help=help_, rich_help_panel=panel, min=min, max=max)


def scale_fit(
    inputs: Annotated[list[str], typer.Argument(help="gentool run directories, globs, CSV or JSON-lines files, "
                                                     "or - for stdin (--form curve: one RUN or RUN/metrics.jsonl).")],
    output: Annotated[Path | None, _opt("Write a scale-fit artifact (fit.json, predictions.csv, plot.png).",
                                           None, "--output", "-o")] = None,
    form: Annotated[str, _opt("power (L=aX^b+c), chinchilla (L=E+A/N^a+B/D^b), isoflop, sigmoid (bounded), "
                              "downstream (C -> loss -> accuracy) or curve (forecast one run: the multi-power law "
                              "of Luo et al. 2025, which follows the learning-rate schedule).")] = "power",
    predict: Annotated[list[str] | None, _opt("Predict at C=1e21, N=..,D=.., X=.. or, for curve, step=FINAL "
                                                 "or step=N (repeatable).")] = None,
    holdout: Annotated[int, _opt("Fit without the K largest runs (isoflop: budgets) and report their error.",
                                 min=0)] = 0,
    bootstrap: Annotated[int, _opt("Resamples of chinchilla's bootstrap over runs; 0: no intervals for any form. The "
                                   "intervals are 95%: profile likelihood for power, sigmoid, downstream and curve, "
                                   "percentile bootstrap over runs for chinchilla, Student t for isoflop (fit.json's "
                                   "interval.meaning says what they assume).", min=0)] = 200,
    bounds: Annotated[str | None, _opt("Sigmoid floor,ceiling, e.g. 0.25,1 (default 0,1 when all y lie in "
                                          "[0, 1]).")] = None,
    x: Annotated[str | None, _opt("Column of X for power/sigmoid, compute for downstream (default C; runs: C, "
                                     "N, D).", COLS)] = None,
    y: Annotated[str | None, _opt("Column of the loss or metric (default loss, downstream acc; runs: loss = "
                                     "val_loss, train_loss).", COLS)] = None,
    n: Annotated[str | None, _opt("Column of parameters N (default N; runs: non-embedding, N_total all).",
                                     COLS)] = None,
    d: Annotated[str | None, _opt("Column of tokens D (default D; derived as C/(6N) when absent).", COLS)] = None,
    c: Annotated[str | None, _opt("Column of compute C (default C; derived as 6ND when absent).", COLS)] = None,
    via: Annotated[str | None, _opt("downstream: the loss column between compute and accuracy (default "
                                       "loss).", COLS)] = None,
    point: Annotated[str, _opt("Per run (run directories, and rows naming their run): final, min (best eval) or "
                               "all (every eval).", CLEAN)] = "final",
    filter_: Annotated[list[str] | None, _opt("Keep rows where KEY=V, KEY>V, ... (repeatable).", CLEAN,
                                                 "--filter")] = None,
    best_of: Annotated[str | None, _opt("Per (N, D) (the other mapped columns), keep the value of this column "
                                           "(e.g. lr) whose runs reached the lowest loss (sigmoid: highest).",
                                           CLEAN)] = None,
    skip: Annotated[float, _opt("Drop the first FRAC of each run's curve.", CLEAN, min=0, max=1)] = 0.0,
    smooth: Annotated[int, _opt("Smooth each curve with a trailing mean of K points (then --point).", CLEAN,
                                min=1)] = 1,
    keep_duplicates: Annotated[bool, _opt("Keep exact duplicate rows (dropped with a warning by default).",
                                          CLEAN)] = False,
    strict: Annotated[bool, _opt("Refuse malformed rows instead of skipping them.", CLEAN)] = False,
    follow: Annotated[bool, _opt("Re-read a growing metrics.jsonl and forecast at every new evaluation until the "
                                 "run ends.", CURVE)] = False,
    stop_if_worse_than: Annotated[str | None, _opt("Exit 3 as soon as the predicted final loss is worse than "
                                                      "this run's actual final loss (or a number) at --alpha.",
                                                      CURVE)] = None,
    alpha: Annotated[float, _opt("Level of --stop-if-worse-than: stop when the one-sided 1-alpha lower bound of "
                                 "the forecast exceeds the reference.", CURVE, min=0, max=1)] = 0.05,
    poll: Annotated[float, _opt("Seconds between re-reads with --follow.", CURVE, min=0)] = 30.0,
    seed: Seed = 0,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Fit a scaling law to run logs, with CIs, holdout and predictions.

    Reads N, D, C and losses straight from gentool run directories (manifest.json, metrics.jsonl) or any CSV /
    JSON lines with column mapping. Malformed rows are skipped with a reason on stderr (--strict refuses them);
    exact duplicates are dropped. --form curve fits the multi-power law of Luo et al. 2025 ("A Multi-Power Law
    for Loss Curve Prediction Across Learning Rate Schedules") to the part of a train-lm run that exists, with
    the schedule from its recipe, and predicts its final loss. Exit status 3: --stop-if-worse-than fired.
    """
    from gentool import console
    from gentool.errors import UsageProblem
    from gentool.scaling.report import rows, title
    from gentool.scaling.study import StudyOptions, run_study

    lim = None
    if bounds is not None:
        try:
            lim = tuple(float(v) for v in bounds.split(","))
            assert len(lim) == 2
        except (ValueError, AssertionError):
            raise UsageProblem(f"bad --bounds {bounds!r}", hint="use FLOOR,CEILING, e.g. 0.25,1") from None
    cols = {k: v for k, v in {"x": x, "y": y, "n": n, "d": d, "c": c, "v": via}.items() if v}
    opts = StudyOptions(inputs=inputs, form=form, columns=cols, point=point, filters=filter_ or [], strict=strict,
                        bootstrap=bootstrap, holdout=holdout, predict=predict or [], seed=seed,
                        keep_duplicates=keep_duplicates, best_of=best_of, skip=skip, smooth=smooth, bounds=lim,
                        follow=follow, poll=poll, stop_if_worse_than=stop_if_worse_than, alpha=alpha)
    result = run_study(opts, output, force=force)
    if json_:
        console.emit(result, as_json=True)
    else:
        console.emit(rows(result), as_json=False, title=title(result))
    if result.get("stop", {}).get("worse"):
        st = result["stop"]
        console.err_console().print(f"stop: the predicted final loss {st['predicted_final']:.4f} is worse than "
                                    f"{st['reference_final']:.4f} at alpha={st['alpha']:g}", markup=False)
        raise typer.Exit(3)


scale_fit.epilog = examples("gentool scale-fit 'runs/*' --form chinchilla --holdout 1 --predict C=1e18 -o fit",
                            "gentool scale-fit log.csv --form power --x flops --y val_loss --predict X=1e21",
                            "gentool scale-fit ladder.csv --form downstream --y acc --best-of lr --predict C=1e22",
                            "gentool scale-fit runs/big --form curve --predict step=FINAL --follow "
                            "--stop-if-worse-than runs/base")
