"""Reading scaling data: gentool run directories (manifest.json + metrics.jsonl), CSV and JSON lines, with
column mapping, filters and a per-row reason for every row skipped."""

from __future__ import annotations

import csv
import glob as globlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gentool.errors import GentoolError, UsageProblem
from gentool.scaling import prep
from gentool.scaling.prep import number


@dataclass
class Point:
    run: str                 # bootstrap and holdout resample whole runs
    values: dict[str, float]
    where: str = ""          # source:line
    order: float | None = None   # position along its run's curve (step, tokens or compute), for --point
    tag: Any = None          # the --best-of column's value
    grouped: bool = False    # one of several points of a named run's curve (--point picks among them)

    def key(self) -> tuple:
        """A canonical sort key from the values alone (never the row's position), for row-order invariance."""
        return tuple(sorted(self.values.items()))


@dataclass
class Table:
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # "source:line: reason"
    sources: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)   # derived columns, duplicates dropped, --best-of, ...


def _llama_params(model: dict[str, Any]) -> tuple[int, int]:
    """(non-embedding, total) parameter counts of a LLaMA config.json, for runs without a manifest yet."""
    d, layers, ff, vocab = (int(model[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                     "vocab_size"))
    heads = int(model["num_attention_heads"])
    hd = int(model.get("head_dim") or d // heads)
    kv = int(model.get("num_key_value_heads") or heads)
    per_layer = 2 * d * heads * hd + 2 * d * kv * hd + 3 * d * ff + 2 * d
    non_emb = layers * per_layer + d
    return non_emb, non_emb + vocab * d * (1 if model.get("tie_word_embeddings") else 2)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise GentoolError("not a JSON object", path=path)
    return data


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _run_records(path: Path, point: str, y_col: str = "loss", problems: list[str] | None = None
                 ) -> list[dict[str, Any]]:
    """Records of one gentool run directory (finished RUN/ or unfinished RUN.partial/).

    N is the non-embedding parameter count (N_total: all parameters), D the tokens and C the FLOPs seen, loss (and
    val_loss) the validation loss, train_loss the training loss. With y_col train_loss every logged step counts
    (--point all: the training curve); otherwise only the steps with an evaluation."""
    manifest = _read_json(path / "manifest.json")
    contents, metrics = _dict(manifest.get("contents")), _dict(manifest.get("metrics"))
    recipe = _dict(manifest.get("config")) if manifest else _read_json(path / "run.json")
    train = _dict(recipe.get("train"))
    base = {"N": contents.get("n_params_non_embedding", contents.get("n_params")), "N_total": contents.get("n_params"),
            "run": path.name, **{k: train.get(k) for k in ("seed", "lr", "schedule", "steps", "warmup",
                                                           "min_lr_ratio", "weight_decay")},
            "batch_tokens": recipe.get("batch_tokens")}
    if not manifest:  # RUN.partial: the counts come from the recipe train-lm saved
        try:
            base["N"], base["N_total"] = _llama_params(_dict(recipe.get("model")))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
    lines = []
    if (path / "metrics.jsonl").is_file():
        for i, raw in enumerate((path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()):
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError):
                rec = None
            if isinstance(rec, dict):
                lines.append(rec)
            elif raw.strip() and problems is not None:
                problems.append(f"{path / 'metrics.jsonl'}:{i + 1}: not a JSON object; line ignored")
    evals = [r for r in lines if number(r.get("val_loss"), finite=False) is not None]
    curve = lines if y_col == "train_loss" else evals   # the points that carry the fitted y

    def rec(r: dict[str, Any]) -> dict[str, Any]:
        return {**base, "D": r.get("tokens"), "C": r.get("flops"), "loss": r.get("val_loss"),
                "val_loss": r.get("val_loss"), "train_loss": r.get("loss"), "step": r.get("step"),
                "lr_now": r.get("lr")}

    if point == "all":
        return [rec(r) for r in curve]
    if point == "min" and curve:
        key = "loss" if y_col == "train_loss" else "val_loss"
        return [rec(min(curve, key=lambda r: v if (v := number(r.get(key))) is not None else math.inf))]
    if manifest:
        extra = {k: v for k, v in metrics.items() if k not in base}  # `gentool evaluate`'s acc, TASK/acc, ...
        return [{**extra, **base, "D": contents.get("tokens_seen"), "C": contents.get("train_flops"),
                 "loss": metrics.get("val_loss"), "val_loss": metrics.get("val_loss"),
                 "train_loss": metrics.get("train_loss"), "step": contents.get("step")}]
    return [rec(curve[-1])] if curve else []  # an unfinished run: its latest evaluation


def _parse_text(text: str, src: str) -> list[dict[str, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        rows = []
        for raw in text.splitlines():
            if not raw.strip():
                rows.append({})
                continue
            try:
                rec = json.loads(raw)
                rows.append(rec if isinstance(rec, dict) else {"__error__": "not a JSON object"})
            except json.JSONDecodeError as e:
                rows.append({"__error__": f"invalid JSON ({e.msg})"})
            except (ValueError, RecursionError) as e:
                rows.append({"__error__": f"invalid JSON ({e})"})
        return rows
    try:
        return list(csv.DictReader(io.StringIO(text)))
    except csv.Error as e:
        raise GentoolError(f"not a valid CSV file ({e})", path=src, hint="give CSV with a header row, or JSON lines") from None


def _expand(inputs: list[str]) -> list[str]:
    out = []
    for item in inputs:
        if item == "-" or Path(item).exists():
            out.append(item)
            continue
        matches = sorted(globlib.glob(item))
        if not matches:
            raise UsageProblem("no such file, directory or glob match", path=item)
        out.extend(matches)
    return out


def _apply_filter(rec: dict[str, Any], filters: list[str]) -> bool:
    for f in filters:
        for op in (">=", "<=", "!=", "=", ">", "<"):
            if op in f:
                key, value = f.split(op, 1)
                have = rec.get(key.strip())
                a, b = number(have, finite=False), number(value, finite=False)
                if a is not None and b is not None:
                    ok = {">=": a >= b, "<=": a <= b, "!=": a != b, "=": a == b, ">": a > b, "<": a < b}[op]
                else:
                    ok = {"=": str(have) == value.strip(), "!=": str(have) != value.strip()}.get(op, False)
                if not ok:
                    return False
                break
        else:
            raise UsageProblem(f"bad --filter {f!r}", hint="use KEY=VALUE, KEY>VALUE, KEY<=VALUE, ...")
    return True


def _table_rows(src: str, path: Path) -> tuple[list[tuple[str, str, dict, bool]], set[str], int]:
    """(where, run, record, grouped) of one CSV / JSON-lines source, the column names it has, its row count.
    grouped: the row names its run (a `run` or `name` column), so several rows can be one run's curve."""
    try:
        text = sys.stdin.read() if src == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GentoolError(f"cannot read ({e})", path=src) from None
    parsed = _parse_text(text, src)
    jsonl = text.lstrip().startswith("{")
    names: set[str] = set()
    rows = []
    for i, r in enumerate(parsed):
        where = f"{src}:{i + 1 if jsonl else i + 2}"
        if isinstance(r, dict) and "__error__" not in r:
            names.update(k for k in r if k is not None)
        named = isinstance(r, dict) and r.get("run", r.get("name")) not in (None, "")
        run = str(r.get("run", r.get("name"))) if named else where
        rows.append((where, run, r, named))
    return rows, names, len(parsed)


def read_table(inputs: list[str], columns: dict[str, str], *, point: str = "final", filters: list[str] = (),
               positive: tuple[str, ...] = (), keep_duplicates: bool = False, best_of: str | None = None,
               skip: float = 0.0, smooth: int = 1, best: str = "min") -> Table:
    """Rows with every mapped column numeric; `positive` columns must also be > 0 (logs are taken).

    A missing D, C (or an X mapped to C) is derived from the others (C = 6ND); a mapped column that no row has is one
    error naming the columns there are. Exact duplicate rows are dropped (warned) unless keep_duplicates. Rows that
    name their run (a run or name column) and run directories with skip/smooth are curves: per run, the first `skip`
    fraction is dropped, y is smoothed by a trailing mean of `smooth` points, and `point` picks final / min / all.
    best_of: per value of the other mapped columns, keep only the points of the best (`best`: min or max y) value
    of that column (a learning-rate sweep)."""
    if point not in ("final", "min", "all"):
        raise UsageProblem(f"unknown --point {point!r}", hint="use final, min or all")
    if not 0 <= skip < 1 or smooth < 1:
        raise UsageProblem("--skip must be in [0, 1) and --smooth at least 1")
    table = Table()
    y_col = columns.get("y", "loss")
    curve_dirs = bool(skip) or smooth > 1
    expanded = _expand(inputs)
    seen_dirs: set[str] = set()
    run_keys: set[str] = set()
    raw: list[tuple[str, str, dict, bool, tuple]] = []   # where, run, record, grouped, roles to derive
    lacking: list[UsageProblem] = []   # tables without a mapped column: skipped while another input has it
    for src in expanded:
        path = Path(src)
        if src != "-" and path.is_dir():
            if not ((path / "manifest.json").is_file() or (path / "metrics.jsonl").is_file()):
                raise UsageProblem("not a gentool run directory (no manifest.json or metrics.jsonl)", path=path)
            if str(path.resolve()) in seen_dirs:
                table.notes["duplicates"] = table.notes.get("duplicates", 0) + 1
                table.skipped.append(f"{path}: given twice; counted once")
                continue
            seen_dirs.add(str(path.resolve()))
            partial = path.name.endswith(".partial")
            if partial and str(path.with_name(path.name[: -len(".partial")])) in map(str, map(Path, expanded)):
                table.skipped.append(f"{path}: an unfinished copy of a finished run that is also given; ignored")
                continue
            try:
                records = _run_records(path, "all" if curve_dirs else point, y_col, table.skipped)
            except (ValueError, OSError) as e:
                raise GentoolError(f"cannot read the run ({e})", path=path) from None
            run_id = str(path)[: -len(".partial")] if partial else str(path)
            table.sources.append({"path": str(path), "kind": "run", **({"unfinished": True} if partial else {})})
            raw += [(f"{path}[{i}]", run_id, r, curve_dirs, ()) for i, r in enumerate(records)]
            run_keys.update(k for r in records for k in r)
            if not records:
                table.skipped.append(f"{path}: no evaluation logged yet" + (
                    "" if y_col == "train_loss" else " (--y train_loss uses the training loss)"))
        else:
            rows, names, n = _table_rows(src, path)
            try:
                roles = prep.check_columns(src, names, columns, best_of, table.notes) if names else ()
            except UsageProblem as e:
                if len(expanded) == 1:
                    raise
                lacking.append(e)
                table.skipped.append(f"{src}: {e.message}; file skipped")
                continue
            table.sources.append({"path": src, "kind": "table", "rows": n})
            raw += [(*r, roles) for r in rows]
    if lacking and not table.sources:   # no input has the columns: the first one's error, as with one input
        raise lacking[0]
    if run_keys and all(s["kind"] == "run" for s in table.sources):   # a column no run directory has: one error
        prep.check_columns("run directories", run_keys, columns, best_of, {})
    raw = prep.drop_duplicates(raw, keep_duplicates, table.notes)
    for where, run, rec, grouped, roles in raw:
        if not rec:
            continue
        if "__error__" in rec:
            table.skipped.append(f"{where}: {rec['__error__']}")
            continue
        if filters and not _apply_filter(rec, list(filters)):
            continue
        rec = prep.derive(rec, columns, roles)
        values, reason = {}, None
        for role, col in columns.items():
            v = number(rec.get(col), finite=False)
            if v is None:
                reason = f"missing or non-numeric {col!r}"
            elif not math.isfinite(v):
                reason = f"{col!r} is {v}"
            elif role in positive and v <= 0:
                reason = f"{col!r} must be positive, got {v:g}"
            if reason:
                break
            values[role] = v
        if reason:
            table.skipped.append(f"{where}: {reason}")
            continue
        tag = None if best_of is None else rec.get(best_of)
        table.points.append(Point(run, values, where, prep.order_of(rec, columns), tag, grouped))
    table.points = prep.select(table.points, point, skip, smooth, table.notes)
    if best_of:
        table.points = prep.keep_best(table.points, best, table.notes)
    return table
