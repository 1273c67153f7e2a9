"""`gentool compare`: training runs grouped by recipe (seeds pooled), and whether the first group is better.

Each run is a training output (the artifact, its OUT.partial/ while it runs, or a metrics.jsonl). Runs whose recipes
differ only in the seed form a group; a group's label is the recipe entries in which the groups differ. Per group:
mean ± sample std over runs of the final metric and of the steps, tokens and training seconds spent; with a target,
also how many runs reached it (k of n) and the steps / tokens / seconds to the first evaluation at or below it: a
mean over all n runs when every run reached it (a run that did not has no such step: the mean is then undefined, and
the runs that did are reported apart). Then a one-sided Welch t-test of the final metric, first group against each
other one (lower is better), the ratios of the first group's mean steps and seconds to the other's, and with a
target the first group's mean steps and seconds to reach it over the other's whole run (with the target at the
other's final metric: "reaches its loss in x the steps"), defined only when every run of the first group reached it.
The verdict `better` is True when every such test has p < alpha. A non-finite metric (a run that diverged) leaves
its group's mean undefined and is counted.

Runs trained on different data (token shards, hence tokenizer), with different objectives (an autoregressive LM
beside a diffusion model) or lacking the metric are refused by name: their numbers would not be comparable.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gentool.errors import GentoolError, UsageProblem

PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


@dataclass
class Run:
    name: str
    recipe: dict[str, Any]
    lines: list[dict[str, Any]]
    tokenizer: str | None = None
    seed: Any = None

    @property
    def objective(self) -> str:
        """What the metric measures: an autoregressive LM's loss, or a diffusion family's (the recipe's family)."""
        family = self.recipe.get("family")
        return str(family) if family else "autoregressive LM"


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = [(i, json.loads(line)) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, ValueError, RecursionError) as e:
        raise UsageProblem(f"cannot read the metrics ({e})", path=path) from None
    for i, rec in lines:
        if not isinstance(rec, dict):
            raise UsageProblem(f"line {i} of the metrics is not a JSON object", path=path,
                               hint="metrics.jsonl holds one object per line, as train-lm writes it")
    return [rec for _, rec in lines]


def read_run(arg: str) -> Run:
    """A run from its output directory, its OUT.partial/ (a run in progress) or its metrics.jsonl."""
    path = Path(arg)
    if path.is_file():
        path = path.parent
    partial = path.with_name(path.name + ".partial")
    if not (path / "metrics.jsonl").is_file() and (partial / "metrics.jsonl").is_file():
        path = partial
    if not (path / "metrics.jsonl").is_file():
        raise UsageProblem("not a training run (no metrics.jsonl)", path=arg, hint="pass train-lm or "
                                                                                   "train-diffusion outputs")
    recipe, tokenizer = {}, None
    if (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
        recipe = manifest.get("config") or {}
        tokenizer = (manifest.get("contents") or {}).get("tokenizer_id")
    elif (path / "run.json").is_file():
        recipe = json.loads((path / "run.json").read_text())
    recipe = json.loads(json.dumps(recipe))
    seed = None
    if isinstance(recipe.get("train"), dict):
        seed = recipe["train"].pop("seed", None)
        recipe["train"].setdefault("optimizer", "adamw")   # left out of AdamW recipes (older runs have none)
    seed = recipe.pop("seed", seed)
    return Run(arg, recipe, _read_jsonl(path / "metrics.jsonl"), tokenizer, seed)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, sort_keys=True)}


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups by recipe without the seed, in the order they first appear."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.recipe, sort_keys=True), Group("")).runs.append(run)
    flats = [_flat(g.runs[0].recipe) for g in groups.values()]
    keys = sorted({k for f in flats for k in f})
    differ = [k for k in keys if len({f.get(k) for f in flats}) > 1]
    for g, f in zip(groups.values(), flats):
        parts = [f"{k.rsplit('.', 1)[-1]}={json.loads(f[k])}" for k in differ
                 if k in f and k.rsplit(".", 1)[-1] not in ("model", "init")]
        g.label = ", ".join(parts) or (g.runs[0].name if len(groups) > 1 else "all runs")
    return list(groups.values())


def _check_comparable(runs: list[Run], metric: str) -> None:
    kinds: dict[str, str] = {}
    for r in runs:
        kinds.setdefault(r.objective, r.name)
    if len(kinds) > 1:
        (ka, a), (kb, b) = list(kinds.items())[:2]
        raise UsageProblem(f"runs {a} and {b} train different objectives ({ka}, {kb}): their {metric} is not "
                           "comparable", hint="compare runs of one kind (train-lm with train-lm, one diffusion "
                                              "family with itself)")
    for what, get in (("data", lambda r: r.recipe.get("data")), ("tokenizer", lambda r: r.tokenizer)):
        seen = {}
        for r in runs:
            v = get(r)
            if v is not None:
                seen.setdefault(json.dumps(v, sort_keys=True), r.name)
        if len(seen) > 1:
            a, b = list(seen.values())[:2]
            raise UsageProblem(f"runs {a} and {b} were trained on different {what}: their {metric} is not "
                               "comparable", hint="compare runs made from the same token shards")
    for r in runs:
        if not any(metric in m for m in r.lines):
            raise UsageProblem(f"run {r.name} has no {metric!r} in its metrics.jsonl", path=r.name,
                               hint="choose another --metric (e.g. loss, val_loss, val_bpb)")


def _stats(xs: list[float]) -> dict[str, Any]:
    """Mean and sample std; undefined (None) when empty or when a value is not finite (counted in non_finite)."""
    bad = sum(1 for x in xs if not math.isfinite(x))
    if not xs or bad:
        return {"mean": None, "std": None, **({"non_finite": bad} if bad else {})}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std}


def _seconds(m: dict[str, Any]) -> float:
    return _number(m.get("train_seconds", m.get("seconds")))


def summarize(group: Group, metric: str, target: float | None) -> dict[str, Any]:
    finals, steps, tokens, secs, hit = [], [], [], [], []
    for r in group.runs:
        evals = [m for m in r.lines if metric in m]
        finals.append(_number(evals[-1][metric]))
        last = r.lines[-1]
        steps.append(_number(last.get("step")))
        tokens.append(_number(last.get("tokens")))
        secs.append(_seconds(last))
        if target is not None:
            first = next((m for m in evals if _number(m[metric]) <= target), None)
            if first is not None:
                hit.append(first)
    out = {"group": group.label, "runs": len(group.runs), "seeds": [r.seed for r in group.runs],
           f"final_{metric}": _stats(finals), "steps": _stats(steps), "tokens": _stats(tokens),
           "seconds": _stats(secs), "_finals": finals}
    if target is not None:
        out["reached"] = len(hit)
        each = {k: [float(f(m)) for m in hit] for k, f in
                (("steps", lambda m: _number(m.get("step"))), ("tokens", lambda m: _number(m.get("tokens"))),
                 ("seconds", _seconds))}
        everyone = len(hit) == len(group.runs)   # a run that never reached it has no step to average
        out["to_target"] = {k: _stats(v) if everyone else {"mean": None, "std": None} for k, v in each.items()}
        out["to_target_reached"] = {k: _stats(v) for k, v in each.items()}   # the k runs that did
    return out


def _number(v: Any) -> float:
    """A metric value as a float (NaN when absent or not a number)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def welch(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """(t, one-sided p) of Welch's test that mean(a) < mean(b); None where it is undefined (fewer than two runs
    in a group, or no spread at all)."""
    if len(a) < 2 or len(b) < 2 or not all(map(math.isfinite, a + b)) or (max(a) == min(a) and max(b) == min(b)):
        return None, None
    from scipy import stats

    t, p = stats.ttest_ind(a, b, equal_var=False, alternative="less")
    return (None, None) if math.isnan(p) else (float(t), float(p))


def plot_runs(groups: list[Group], metric: str, out: Path, target: float | None = None) -> None:
    """The metric against steps and against training seconds, one colour per group, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, g in enumerate(groups):
        for j, r in enumerate(g.runs):
            evals = [m for m in r.lines if metric in m]
            for ax, x in zip(axes, ([m["step"] for m in evals], [_seconds(m) for m in evals])):
                ax.plot(x, [m[metric] for m in evals], color=f"C{i}", alpha=0.7, label=g.label if j == 0 else None)
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    from gentool.artifacts import atomic_file

    try:
        with atomic_file(out, suffix=True) as tmp:  # matplotlib picks the format from the suffix
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def compare(args: list[str], *, metric: str = "val_loss", target: float | None = None, alpha: float = 0.01,
            plot: Path | None = None) -> dict[str, Any]:
    if plot is not None and plot.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise UsageProblem(f"--plot {plot}: not an image format matplotlib writes",
                           hint="end the name in " + ", ".join("." + f for f in PLOT_FORMATS[:3]))
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise GentoolError("--plot needs matplotlib", hint="pip install 'gentool[plot]'") from None
    paths = [p for a in args for p in (sorted(glob.glob(a)) if any(c in a for c in "*?[") else [a])]
    if not paths:
        raise UsageProblem("no runs to compare", hint="pass run directories, e.g. runs/muon-s* runs/adamw-s*")
    if plot is not None:  # an existing picture is replaced; a run, a directory or a missing parent is refused
        from gentool.artifacts import check_output

        check_output(plot, force=True, sources=paths, file=True, option="--plot")
    runs = [read_run(p) for p in paths]
    _check_comparable(runs, metric)
    groups = group_runs(runs)
    rows = [summarize(g, metric, target) for g in groups]
    tests = []
    for g, row in zip(groups[1:], rows[1:]):
        t, p = welch(rows[0]["_finals"], row["_finals"])
        ratio = {k: (rows[0][k]["mean"] / row[k]["mean"]) if rows[0][k]["mean"] is not None and row[k]["mean"]
                 else None for k in ("steps", "seconds")}
        test = {"first": groups[0].label, "other": g.label, "t": t, "p": p, "ratio_first_to_other": ratio}
        if target is not None:  # the first group's way to the target against the other's whole run
            first = rows[0]["to_target"]
            test["first_to_target_vs_other_final"] = {
                k: first[k]["mean"] / row[k]["mean"] if first[k]["mean"] is not None and row[k]["mean"] else None
                for k in ("steps", "seconds")}
        tests.append(test)
    for row in rows:
        row.pop("_finals")
    better = bool(tests) and all(x["p"] is not None and x["p"] < alpha for x in tests)
    if plot is not None:
        plot_runs(groups, metric, plot, target)
    return {"metric": metric, "target": target, "alpha": alpha, "groups": rows, "tests": tests, "better": better}
