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


@dataclass
class Point:
    run: str                 # bootstrap and holdout resample whole runs
    values: dict[str, float]


@dataclass
class Table:
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # "source:line: reason"
    sources: list[dict[str, Any]] = field(default_factory=list)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def _run_records(path: Path, point: str) -> list[dict[str, Any]]:
    """Records of one gentool run directory: N, D, C and losses from the manifest and metrics.jsonl."""
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
    contents, metrics = manifest.get("contents", {}), manifest.get("metrics", {})
    n = contents.get("n_params_non_embedding", contents.get("n_params"))
    base = {"N": n, "N_total": contents.get("n_params"), "seed": manifest.get("config", {}).get("train", {})
            .get("seed")}
    lines = []
    if (path / "metrics.jsonl").is_file():
        for raw in (path / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                lines.append(rec)
    evals = [r for r in lines if "val_loss" in r]
    if point == "all":
        return [{**base, "D": r.get("tokens"), "C": r.get("flops"), "loss": r.get("val_loss"),
                 "train_loss": r.get("loss"), "step": r.get("step")} for r in evals]
    if point == "min" and evals:
        r = min(evals, key=lambda r: r["val_loss"] if _num(r["val_loss"]) is not None else math.inf)
        return [{**base, "D": r.get("tokens"), "C": r.get("flops"), "loss": r.get("val_loss"), "step": r.get("step")}]
    if manifest:
        return [{**base, "D": contents.get("tokens_seen"), "C": contents.get("train_flops"),
                 "loss": metrics.get("val_loss", metrics.get("train_loss")), "train_loss": metrics.get("train_loss")}]
    if evals:  # an unfinished run (RUN.partial): its last evaluation
        r = evals[-1]
        return [{**base, "D": r.get("tokens"), "C": r.get("flops"), "loss": r.get("val_loss")}]
    return []


def _parse_text(text: str) -> list[dict[str, Any]]:
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
        return rows
    return list(csv.DictReader(io.StringIO(text)))


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
                a, b = _num(have), _num(value)
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


def read_table(inputs: list[str], columns: dict[str, str], *, point: str = "final", filters: list[str] = (),
               positive: tuple[str, ...] = ()) -> Table:
    """Rows with every mapped column numeric; `positive` columns must also be > 0 (logs are taken)."""
    if point not in ("final", "min", "all"):
        raise UsageProblem(f"unknown --point {point!r}", hint="use final, min or all")
    table = Table()
    for src in _expand(inputs):
        path = Path(src)
        if src != "-" and path.is_dir():
            if not ((path / "manifest.json").is_file() or (path / "metrics.jsonl").is_file()):
                raise UsageProblem("not a gentool run directory (no manifest.json or metrics.jsonl)", path=path)
            try:
                records = _run_records(path, point)
            except (json.JSONDecodeError, OSError) as e:
                raise GentoolError(f"cannot read the run ({e})", path=path) from None
            run_id, table.sources = str(path), table.sources + [{"path": str(path), "kind": "run"}]
            rows = [(f"{path}:{i + 1}", run_id, r) for i, r in enumerate(records)]
            if not records:
                table.skipped.append(f"{path}: no finished evaluation in the run")
        else:
            try:
                text = sys.stdin.read() if src == "-" else path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GentoolError(f"cannot read ({e})", path=src) from None
            parsed = _parse_text(text)
            table.sources.append({"path": src, "kind": "table", "rows": len(parsed)})
            rows = []
            for i, r in enumerate(parsed):
                run = str(r.get("run", r.get("name", f"{src}:{i + 2}"))) if isinstance(r, dict) else f"{src}:{i}"
                rows.append((f"{src}:{i + 2 if not text.lstrip().startswith('{') else i + 1}", run, r))
        for where, run, rec in rows:
            if not rec:
                continue
            if "__error__" in rec:
                table.skipped.append(f"{where}: {rec['__error__']}")
                continue
            if filters and not _apply_filter(rec, list(filters)):
                continue
            values, reason = {}, None
            for role, col in columns.items():
                v = _num(rec.get(col))
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
            else:
                table.points.append(Point(run, values))
    return table
