"""`gentool compare`: training runs grouped by recipe over seeds, and a Welch t-test between the groups."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import Json, examples


def _ms(s: dict, fmt: str = ".4f") -> str:
    if s.get("non_finite"):
        return f"— ({s['non_finite']} runs not finite)"
    return "—" if s["mean"] is None else f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def compare(
    runs: Annotated[list[str], typer.Argument(help="Run directories (train-lm / train-diffusion outputs, "
                                                   "OUT.partial/ or metrics.jsonl), or quoted globs.")],
    metric: Annotated[str, typer.Option(help="The metric compared (lower is better): val_loss, val_bpb, "
                                             "loss, ...")] = "val_loss",
    target: Annotated[Optional[float], typer.Option(help="Also report the steps, tokens and training "
                                                         "seconds to first reach this metric value.")] = None,
    alpha: Annotated[float, typer.Option(min=0, max=1,
                                         help="Significance level: exit 0 only when the first group's final "
                                              "metric is lower than every other group's at p < alpha.")] = 0.01,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: the metric against steps and "
                                                      "training seconds.")] = None,
    json_: Json = False,
) -> None:
    """Compare training runs: mean ± std over seeds and a Welch t-test.

    Runs whose recipes differ only in --seed form a group (groups keep the order of their first run). Per group:
    the final metric, steps, tokens and training seconds (evaluation and checkpoints left out), and with --target
    the steps / tokens / seconds to reach it. The test is one-sided Welch on the final metric, first group against
    each other; the exit status is 0 when the first group is better at --alpha, 1 when not, so a Makefile can
    gate on it. Runs on different data or tokenizers, or without the metric, are refused.
    """
    from gentool import console
    from gentool.compare import compare as run_compare

    result = run_compare(runs, metric=metric, target=target, alpha=alpha, plot=plot)
    if json_:
        console.emit(result, as_json=True)
    else:
        for i, g in enumerate(result["groups"], 1):
            row = {"runs": f"{g['runs']} (seeds {', '.join(str(s) for s in g['seeds'])})",
                   f"final {metric}": _ms(g[f"final_{metric}"]), "steps": _ms(g["steps"], ".0f"),
                   "tokens": _ms(g["tokens"], ".0f"), "train seconds": _ms(g["seconds"], ".1f")}
            if target is not None:
                every = g["reached"] == g["runs"]
                t = g["to_target"] if every else g["to_target_reached"]
                row[f"reached {target:g}"] = f"{g['reached']}/{g['runs']}" + ("" if every else
                                                                            " (the others never did)")
                if g["reached"]:
                    row.update({f"to target: {k}" + ("" if every else f" ({g['reached']} that reached it)"):
                                _ms(t[k], ".0f" if k != "seconds" else ".1f") for k in ("steps", "tokens", "seconds")})
            console.emit(row, as_json=False, title=f"[{i}] {g['group']}")
        for j, t in enumerate(result["tests"], 2):
            p = "undefined (needs 2+ runs per group with spread)" if t["p"] is None else f"{t['p']:.3g}"
            ratios = ", ".join(f"{k} ×{v:.3f}" for k, v in t["ratio_first_to_other"].items() if v is not None)
            typer.echo(f"Welch t-test of the final {metric}, [1] < [{j}]: p = {p}"
                       + (f"; [1] uses {ratios} of [{j}]" if ratios else ""))
            reach = ", ".join(f"{k} ×{v:.3f}" for k, v in t.get("first_to_target_vs_other_final", {}).items()
                              if v is not None)
            if reach:
                typer.echo(f"[1] reaches {target:g} in {reach} of [{j}]'s whole run")
            elif target is not None and result["groups"][0]["reached"] < result["groups"][0]["runs"]:
                g1 = result["groups"][0]
                typer.echo(f"[1] reached {target:g} in {g1['reached']} of {g1['runs']} runs: no ratio to [{j}]'s "
                           "whole run")
        verdict = "better" if result["better"] else "not shown better"
        typer.echo(f"first group {verdict} at alpha {alpha:g}")
    if plot is not None:
        console.log(f"wrote {plot}")
    raise typer.Exit(0 if result["better"] else 1)


compare.epilog = examples(
    "gentool compare runs/muon-s* runs/adamw-s*",
    "gentool compare 'runs/muon-*' 'runs/adamw-*' --target 4.2 --plot speedrun.png",
    "gentool compare runs/a runs/b --metric val_bpb --alpha 0.05 --json",
)
