"""Cleaning scaling data between reading and fitting: column checks and derived columns, exact duplicates, one
point per run (--point with --skip / --smooth), and the best run of a sweep (--best-of)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import numpy as np

from gentool.errors import UsageProblem

ORDER_COLUMNS = ("step", "tokens", "D", "flops", "C")   # a curve's position, in this order of preference


def number(v: Any, *, finite: bool = True) -> float | None:
    """A table cell as a float, or None: booleans, blanks and text (and non-finite values unless finite=False)."""
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) or not finite else None


def derivable(role: str, columns: dict[str, str], names: set[str]) -> str | None:
    """How a missing column of `role` follows from the others (C = 6ND), or None."""
    n, d, c = columns.get("n", "N"), columns.get("d", "D"), columns.get("c", "C")
    if role == "d" and {n, c} <= names:
        return f"{columns.get('d', 'D')} = {c} / (6 {n})"
    if role in ("c", "x") and columns.get(role) == columns.get("c", "C") and {n, d} <= names:
        return f"{columns[role]} = 6 {n} {d}"
    return None


def check_columns(src: str, names: set[str], columns: dict[str, str], best_of: str | None,
                  notes: dict[str, Any]) -> tuple[str, ...]:
    """The roles whose column the source lacks but can derive; one error naming the source's columns when a mapped
    column is absent and cannot be derived."""
    roles = []
    for role, col in columns.items():
        if col in names:
            continue
        how = derivable(role, columns, names)
        if how is None:
            flag = {"x": "--x", "y": "--y", "n": "--n", "d": "--d", "c": "--c"}.get(role, "--" + role)
            raise UsageProblem(f"no column {col!r}; the columns are: {', '.join(sorted(names, key=str))}", path=src,
                               hint=f"map it with {flag} NAME")
        roles.append(role)
        notes.setdefault("derived", [])
        if how not in notes["derived"]:
            notes["derived"].append(how)
    if best_of is not None and best_of not in names:
        raise UsageProblem(f"no column {best_of!r} for --best-of; the columns are: "
                           + ", ".join(sorted(names, key=str)), path=src)
    return tuple(roles)


def derive(rec: dict[str, Any], columns: dict[str, str], roles: tuple[str, ...]) -> dict[str, Any]:
    """rec with the columns of `roles` (absent from its source) computed: D = C / (6N), C (or X) = 6ND."""
    if not roles:
        return rec
    n, d, c = columns.get("n", "N"), columns.get("d", "D"), columns.get("c", "C")
    vn, vd, vc = number(rec.get(n)), number(rec.get(d)), number(rec.get(c))
    rec = dict(rec)
    for role in roles:
        if role == "d" and vn and vc is not None:
            rec[columns["d"]] = vc / (6 * vn)
        elif role in ("c", "x") and vn is not None and vd is not None:
            rec[columns[role]] = 6 * vn * vd
    return rec


def drop_duplicates(rows: list[tuple[str, str, dict, bool]], keep: bool, notes: dict[str, Any]) -> list:
    """Exact duplicate rows (every field equal; the run's name too when there is one) counted once, unless keep."""
    seen: dict[str, str] = {}
    copies: dict[str, int] = defaultdict(int)
    out, dropped = [], []
    for where, run, rec, grouped, roles in rows:
        if not isinstance(rec, dict) or not rec or "__error__" in rec:
            out.append((where, run, rec, grouped, roles))
            continue
        try:
            key = json.dumps(rec, sort_keys=True, default=str)
        except (TypeError, ValueError):
            key = repr(sorted(rec.items(), key=lambda kv: str(kv[0])))
        if key in seen:
            dropped.append((where, seen[key]))
            copies[key] += 1
            if keep:   # the k-th copy of a named run's rows is a run of its own
                out.append((where, f"{run}#{copies[key]}" if grouped else run, rec, grouped, roles))
            continue
        seen[key] = where
        out.append((where, run, rec, grouped, roles))
    if dropped:
        notes["duplicates"] = notes.get("duplicates", 0) + len(dropped)
        notes["duplicate_example"] = f"{dropped[0][0]} repeats {dropped[0][1]}"
        notes["duplicates_kept"] = keep
    return out


def order_of(rec: dict[str, Any], columns: dict[str, str]) -> dict[str, float]:
    """The candidate positions of a row along its run's curve (step, tokens, D, flops, C, X)."""
    cands = list(ORDER_COLUMNS) + [columns[r] for r in ("x", "d", "c") if r in columns]
    return {c: v for c in cands if (v := number(rec.get(c))) is not None}


def _curve_order(points: list) -> list:
    """A run's points along its curve: by the first position column all of them have, else as read."""
    for col in dict.fromkeys(c for p in points for c in (p.order or {})):
        if all(col in (p.order or {}) for p in points):
            return sorted(points, key=lambda p: p.order[col])
    return points


def select(points: list, point: str, skip: float, smooth: int, notes: dict[str, Any]) -> list:
    """Per named run (several points): drop the first `skip` fraction, smooth y (trailing mean of `smooth`), then
    keep the final point, the one with the lowest y, or all. Points that are their own run pass unchanged."""
    groups: dict[str, list] = defaultdict(list)
    out = []
    for p in points:
        if p.grouped:
            groups[p.run].append(p)
        else:
            out.append(p)
    reduced = 0
    for pts in groups.values():
        pts = _curve_order(pts)
        pts = pts[math.floor(skip * len(pts)):] or pts[-1:]
        if smooth > 1:
            y = np.array([p.values["y"] for p in pts])
            c = np.concatenate([[0.0], np.cumsum(y)])
            lo = np.maximum(np.arange(len(y)) + 1 - smooth, 0)
            for i, p in enumerate(pts):
                p.values = {**p.values, "y": float((c[i + 1] - c[lo[i]]) / (i + 1 - lo[i]))}
        if point == "final":
            pts = pts[-1:]
        elif point == "min":
            pts = [min(pts, key=lambda p: p.values["y"])]
        reduced += len(pts) > 0
        out.extend(pts)
    if groups and point != "all":
        notes["curves"] = reduced
    return out


def keep_best(points: list, best: str, notes: dict[str, Any]) -> list:
    """--best-of COL: among points that agree on every mapped column but y (one (N, D) of a learning-rate sweep),
    keep those of the COL value with the best mean y (lowest, or highest when best == 'max')."""
    groups: dict[tuple, list] = defaultdict(list)
    for p in points:
        groups[tuple(sorted((k, v) for k, v in p.values.items() if k != "y"))].append(p)
    out, dropped = [], 0
    sign = -1.0 if best == "max" else 1.0
    for key in sorted(groups):
        by_tag: dict[str, list] = defaultdict(list)
        for p in groups[key]:
            by_tag[str(p.tag)].append(p)
        tag = min(sorted(by_tag), key=lambda t: sign * float(np.mean([p.values["y"] for p in by_tag[t]])))
        out.extend(by_tag[tag])
        dropped += sum(len(v) for t, v in by_tag.items() if t != tag)
    notes["best_of_dropped"] = dropped
    return out
