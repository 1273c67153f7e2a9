"""The table that `gentool scale-fit` prints (without --json): one row per quantity, intervals in brackets."""

from __future__ import annotations

from typing import Any


def _fmt(v: dict[str, Any]) -> str:
    text = f"{v['value']:.6g}"
    if v.get("ci95"):
        lo, hi = v["ci95"]
        text += f"  [{lo:.4g}, {hi:.4g}]"
        if v.get("open"):
            text += f" (open at the {' and '.join(v['open'])} end: a bound)"
    if v.get("bound_hits"):
        text += f" ({v['bound_hits']} resamples on a bound)"
    return text


def title(result: dict[str, Any]) -> str:
    method = result.get("interval", {}).get("method")
    return f"scale-fit (95% {method} intervals in brackets)" if method else "scale-fit"


def rows(result: dict[str, Any]) -> dict[str, Any]:
    if result["form"] == "curve":
        out: dict[str, Any] = {"form": "curve (multi-power law, Luo et al. 2025)", "run": result["run"],
                               "observed": f"step {result['observed_step']} of {result['steps']} "
                                           f"({100 * result['fraction']:.0f}%)",
                               "points fitted": f"{result['n_points']} (steps {result['fit_steps'][0]}.."
                                                f"{result['fit_steps'][1]})",
                               "rmse": result["rmse"], "evaluation noise": result["noise"]}
        out.update({k: f"{v['value']:.6g}" for k, v in result["params"].items()})
    else:
        out = {"form": result["form"], "points": f"{result['n_points']} from {result['n_runs']} runs",
               "skipped rows": result["skipped"]}
        notes = result.get("notes", {})
        if notes.get("derived"):
            out["derived"] = "; ".join(notes["derived"])
        if notes.get("duplicates"):
            out["duplicates"] = f"{notes['duplicates']} " + ("kept" if notes.get("duplicates_kept") else "dropped")
        out.update({"fit loss": f"{result['fit_loss']:.4g}", "rmse": result["rmse"],
                    "max |residual|": result["max_abs_residual"]})
        out.update({k: _fmt(v) for k, v in result["params"].items()})
    for p in result["predictions"]:
        at = ",".join(f"{k}={v:g}" for k, v in p["at"].items())
        out.update({f"predict {at}: {k}": _fmt(v) for k, v in p.items() if k not in ("at", "x")})
    for h in result.get("holdout", []):
        out[f"holdout {h['run']}"] = f"predicted {h['predicted']:.4g} actual {h['actual']:.4g} " \
                                     f"(abs err {h['abs_err']:.4g}, rel err {100 * h['rel_err']:.2f}%)"
    s = result.get("holdout_summary")
    if s:
        out["holdout summary"] = f"mean rel err {100 * s['mean_rel_err']:.2f}%, max {100 * s['max_rel_err']:.2f}%, " \
                                 f"bias {100 * s['bias']:+.2f}% over {s['n']}"
    if "stop" in result:
        st = result["stop"]
        out["reference final"] = f"{st['reference_final']:.4f} ({st['reference']})"
        out["verdict"] = (f"worse: the predicted final loss is above the reference at alpha={st['alpha']:g} "
                          f"(one-sided lower bound {st['lower_bound']:.4f})" if st["worse"] else
                          f"not worse at alpha={st['alpha']:g} (one-sided lower bound {st['lower_bound']:.4f})")
    if result.get("interval", {}).get("meaning"):
        out["intervals"] = result["interval"]["meaning"]
    return out
