"""Messy inputs: one point per named run, duplicates, derived columns, --best-of, --skip/--smooth, row order."""

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from gentool.errors import UsageProblem
from gentool.scaling.io import read_table
from gentool.scaling.study import StudyOptions, run_study

_spec = importlib.util.spec_from_file_location("_scaling_synth", Path(__file__).with_name("_synth.py"))
_synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synth)


def _curves(n_runs=6, steps=(100, 200, 300, 400)):
    """Whole loss curves in one table: run r{i} of compute scale s_i logged at several steps, in shuffled order."""
    rows = []
    for i in range(n_runs):
        scale = 10.0 ** (12 + i)
        for step in steps:
            c = scale * step / steps[-1]
            rows.append({"run": f"r{i}", "step": step, "C": c, "loss": 1e4 * c**-0.3 + 1.8})
    random.Random(0).shuffle(rows)
    return rows


def test_point_final_and_min_pick_one_row_per_named_run(csv_file):
    rows = _curves()
    path = csv_file("curves.csv", rows)
    cols = {"x": "C", "y": "loss"}
    t = read_table([path], cols)
    assert len(t.points) == 6 and t.notes["curves"] == 6   # not 24 points
    for p in t.points:
        final = max((r for r in rows if r["run"] == p.run), key=lambda r: r["step"])
        assert p.values == {"x": final["C"], "y": final["loss"]}
    # min: the lowest loss of the curve (here also the last, as the loss falls); all: every row
    assert sorted(p.values["y"] for p in read_table([path], cols, point="min").points) == \
        sorted(min(r["loss"] for r in rows if r["run"] == f"r{i}") for i in range(6))
    assert len(read_table([path], cols, point="all").points) == 24
    # JSON lines with a `name` column, no step: ordered by C
    (Path(path).parent / "c.jsonl").write_text("\n".join(
        json.dumps({"name": r["run"], "C": r["C"], "loss": r["loss"]}) for r in rows))
    t = read_table([str(Path(path).parent / "c.jsonl")], cols)
    assert len(t.points) == 6 and {p.values["x"] for p in t.points} == {10.0 ** (12 + i) for i in range(6)}


def test_skip_and_smooth_a_noisy_accuracy_curve(csv_file):
    rows = [{"run": "a", "step": s, "acc": v} for s, v in zip(range(1, 11), [9, 1, 2, 3, 4, 5, 6, 7, 8, 9])]
    path = csv_file("acc.csv", rows)
    cols = {"x": "step", "y": "acc"}
    # skip 0.1 drops the first row (the 9); smooth 3: trailing means; final = mean of the last 3 = 8
    (p,) = read_table([path], cols, skip=0.1, smooth=3).points
    assert p.values["y"] == pytest.approx(8.0) and p.values["x"] == 10
    pts = read_table([path], cols, point="all", skip=0.1, smooth=3).points
    assert [q.values["y"] for q in pts] == pytest.approx([1, 1.5, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(UsageProblem, match="--skip"):
        read_table([path], cols, skip=1.0)


def test_duplicates_are_dropped_unless_kept(csv_file, capsys):
    rows = _synth.power_rows(0)
    path = csv_file("dup.csv", rows * 30)
    t = read_table([path], {"x": "C", "y": "loss"})
    assert len(t.points) == 20 and t.notes["duplicates"] == 29 * 20
    assert len(read_table([path], {"x": "C", "y": "loss"}, keep_duplicates=True).points) == 600
    once = run_study(StudyOptions([csv_file("once.csv", rows)], bootstrap=0))
    dup = run_study(StudyOptions([path], bootstrap=0))
    assert dup["params"] == once["params"] and dup["n_points"] == 20
    assert "600 exact duplicate rows" not in capsys.readouterr().err   # 580 of them, named with an example
    # the same file given twice counts once too
    assert len(read_table([path, path], {"x": "C", "y": "loss"}).points) == 20


def test_derived_columns_are_named(csv_file):
    rows = _synth.chinchilla_rows(0, sizes=3, budgets=3)
    no_d = [{k: v for k, v in r.items() if k != "D"} for r in rows]
    t = read_table([csv_file("nod.csv", no_d)], {"n": "N", "d": "D", "y": "loss"})
    assert t.notes["derived"] == ["D = C / (6 N)"]
    assert [p.values["d"] for p in t.points] == pytest.approx([r["D"] for r in rows], rel=1e-12)
    no_c = [{k: v for k, v in r.items() if k != "C"} for r in rows]
    t = read_table([csv_file("noc.csv", no_c)], {"x": "C", "y": "loss"})
    assert t.notes["derived"] == ["C = 6 N D"] and [p.values["x"] for p in t.points] == pytest.approx(
        [r["C"] for r in rows], rel=1e-12)
    with pytest.raises(UsageProblem, match=r"no column 'flops'; the columns are: C, N, loss, run"):
        read_table([csv_file("noflops.csv", no_d)], {"x": "flops", "y": "loss"})


def test_best_of_keeps_the_best_learning_rate(csv_file):
    rows = []
    for r in _synth.chinchilla_rows(0, sizes=3, budgets=3):
        for lr, penalty in ((1e-3, 0.05), (3e-3, 0.0), (1e-2, 0.2)):
            rows.append({**r, "run": f"{r['run']}-lr{lr}", "lr": lr, "loss": r["loss"] + penalty})
    t = read_table([csv_file("sweep.csv", rows)], {"n": "N", "d": "D", "y": "loss"}, best_of="lr")
    assert len(t.points) == 9 and {p.tag for p in t.points} == {"0.003"} and t.notes["best_of_dropped"] == 18
    with pytest.raises(UsageProblem, match="no column 'wd' for --best-of"):
        read_table([csv_file("sweep2.csv", rows)], {"n": "N", "d": "D", "y": "loss"}, best_of="wd")


def test_bootstrap_does_not_depend_on_row_order_without_a_run_column(csv_file):
    rows = [{k: v for k, v in r.items() if k != "run"} for r in _synth.power_rows(4)]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    a = run_study(StudyOptions([csv_file("a.csv", rows)], bootstrap=30, seed=3, predict=["C=1e20"]))
    b = run_study(StudyOptions([csv_file("b.csv", shuffled)], bootstrap=30, seed=3, predict=["C=1e20"]))
    assert a["params"] == b["params"] and a["predictions"] == b["predictions"]


def test_isoflop_holdout_drops_the_largest_budgets(csv_file):
    rng = np.random.default_rng(0)
    rows = []
    for c in (1e15, 1e16, 1e17, 1e18):
        for f in (0.25, 0.5, 1, 2, 4):
            n = 0.1 * c**0.5 * f   # N_opt = 0.1 C^0.5 exactly: the parabolas' vertices
            rows.append({"run": f"{c:g}-{f}", "N": n, "C": c * (1 + rng.uniform(-0.01, 0.01)),
                         "loss": 2 + 30 * c**-0.1 + 0.05 * np.log(f) ** 2})
    res = run_study(StudyOptions([csv_file("iso.csv", rows)], form="isoflop", columns={"n": "N"}, holdout=1,
                                 bootstrap=0))
    assert {d["run"] for d in res["data"] if d["held_out"]} == {f"1e+18-{f}" for f in (0.25, 0.5, 1, 2, 4)}
    assert res["n_points"] == 15 and res["n_holdout"] == 5
    (h,) = res["holdout"]
    assert h["quantity"] == "N_opt" and h["actual"] == pytest.approx(1e8, rel=1e-6)
    # the budgets' compute is jittered by 1%, so the fitted law is off by a few tenths of a percent
    assert h["predicted"] == pytest.approx(1e8, rel=5e-3) and res["holdout_summary"]["max_rel_err"] < 5e-3
