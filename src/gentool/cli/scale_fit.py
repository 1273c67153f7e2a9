"""`gentool scale-fit`: fit scaling laws to run logs, with bootstrap CIs and a holdout test."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import Force, Json, Seed, examples

Col = Annotated[str | None, typer.Option()]


def scale_fit(
    inputs: Annotated[list[str], typer.Argument(help="gentool run directories, globs, CSV or JSON-lines files, "
                                                     "or - for stdin.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write a scale-fit artifact (fit.json, "
                                                                         "predictions.csv, plot.png).")] = None,
    form: Annotated[str, typer.Option(help="power (L=aX^b+c), chinchilla (L=E+A/N^a+B/D^b), isoflop or "
                                           "sigmoid.")] = "power",
    x: Annotated[str | None, typer.Option(help="Column of X for power/sigmoid (default C; runs: C, N, D).")] = None,
    y: Annotated[str | None, typer.Option(help="Column of the loss or metric (default loss; runs: loss = "
                                                  "val_loss, train_loss).")] = None,
    n: Annotated[str | None, typer.Option(help="Column of parameters N (default N; in run directories N is "
                                                  "non-embedding, N_total all parameters).")] = None,
    d: Annotated[str | None, typer.Option(help="Column of tokens D (default D).")] = None,
    c: Annotated[str | None, typer.Option(help="Column of compute C (default C).")] = None,
    filter_: Annotated[list[str] | None, typer.Option("--filter", help="Keep rows where KEY=V, KEY>V, ... "
                                                                          "(repeatable).")] = None,
    point: Annotated[str, typer.Option(help="Per run: final, min (best eval) or all (every eval).")] = "final",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples over runs for 95% CIs (0: none).")] = 200,
    holdout: Annotated[int, typer.Option(help="Fit without the K largest runs and report their error.")] = 0,
    predict: Annotated[list[str] | None, typer.Option(help="Predict at C=1e21, N=..,D=.. or X=.. "
                                                              "(repeatable).")] = None,
    strict: Annotated[bool, typer.Option(help="Refuse malformed rows instead of skipping them.")] = False,
    seed: Seed = 0,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Fit a scaling law to run logs, with CIs, holdout and predictions.

    Reads N, D, C and losses straight from gentool run directories (manifest.json, metrics.jsonl) or any CSV /
    JSON lines with column mapping. Malformed rows are skipped with a reason on stderr (--strict refuses them).
    """
    from gentool import console
    from gentool.scaling.study import StudyOptions, run_study

    opts = StudyOptions(inputs=inputs, form=form, columns={k: v for k, v in {"x": x, "y": y, "n": n, "d": d, "c": c}.items()
                                                           if v}, point=point, filters=filter_ or [],
                        strict=strict, bootstrap=bootstrap, holdout=holdout, predict=predict or [], seed=seed)
    result = run_study(opts, output, force=force)
    if json_:
        console.emit(result, as_json=True)
        return
    def fmt(v: dict) -> str:
        return f"{v['value']:.6g}" + (f"  [{v['ci95'][0]:.4g}, {v['ci95'][1]:.4g}]" if v["ci95"] else "")

    rows = {"form": result["form"], "points": f"{result['n_points']} from {result['n_runs']} runs",
            "skipped rows": result["skipped"], "fit loss": f"{result['fit_loss']:.4g}",
            "rmse": result["rmse"], "max |residual|": result["max_abs_residual"]}
    rows.update({k: fmt(v) for k, v in result["params"].items()})
    for p in result["predictions"]:
        at = ",".join(f"{k}={v:g}" for k, v in p["at"].items())
        rows.update({f"predict {at}: {k}": fmt(v) for k, v in p.items() if k != "at"})
    for h in result["holdout"]:
        rows[f"holdout {h['run']}"] = f"predicted {h['predicted']:.4f} actual {h['actual']:.4f} " \
                                      f"(abs err {h['abs_err']:.4f}, rel err {100 * h['rel_err']:.2f}%)"
    console.emit(rows, as_json=False, title="scale-fit (95% bootstrap CIs in brackets)" if bootstrap else
                 "scale-fit")


scale_fit.epilog = examples("gentool scale-fit 'runs/*' --form chinchilla --holdout 1 --predict C=1e18 -o fit",
                            "gentool scale-fit log.csv --form power --x flops --y val_loss --predict X=1e21",
                            "cat runs.jsonl | gentool scale-fit - --form isoflop --n params --c compute")
