"""Bounded sigmoid (floor / ceiling, bound warnings, no numpy warnings), interval bounds and the two-step
compute -> loss -> accuracy fit."""

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from gentool.errors import UsageProblem
from gentool.scaling import laws
from gentool.scaling.downstream import propagate
from gentool.scaling.fit import fit_form
from gentool.scaling.intervals import Interval
from gentool.scaling.study import StudyOptions, run_study

_spec = importlib.util.spec_from_file_location("_scaling_synth", Path(__file__).with_name("_synth.py"))
_synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synth)


def _accuracy_rows(seed=0, hi=0.98, n=24, noise=0.015):
    """Accuracy rising with log compute towards hi, sampled only up to where it is still climbing."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-3, 1.0, n)
    acc = 0.25 + (hi - 0.25) / (1 + np.exp(-2.0 * x)) + rng.normal(0, noise, n)
    return [{"run": f"r{i}", "x": float(v), "acc": float(min(max(a, 0), 1))} for i, (v, a) in enumerate(zip(x, acc))]


def test_accuracy_asymptotes_stay_in_their_bounds(csv_file):
    path = csv_file("acc.csv", _accuracy_rows())
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no numpy overflow or scipy warnings leak
        res = run_study(StudyOptions([path], form="sigmoid", columns={"x": "x", "y": "acc"}, bootstrap=0,
                                     predict=["X=4"]))
    p = {k: v["value"] for k, v in res["params"].items()}
    assert 0 <= p["lo"] <= p["hi"] <= 1 and p["k"] > 0
    assert 0 <= res["predictions"][0]["y"]["value"] <= 1
    # a floor at chance (0.25) for a 4-way task: the fitted floor cannot go below it
    res = run_study(StudyOptions([path], form="sigmoid", columns={"x": "x", "y": "acc"}, bootstrap=0,
                                 bounds=(0.25, 1.0)))
    assert res["params"]["lo"]["value"] >= 0.25
    assert any("points lie outside the bounds [0.25, 1]" in w for w in res["warnings"])   # noise below chance
    with pytest.raises(UsageProblem, match="floor must be below"):
        run_study(StudyOptions([path], form="sigmoid", columns={"x": "x", "y": "acc"}, bounds=(1.0, 0.5)))


def test_a_ceiling_the_data_cannot_determine_is_warned_and_its_interval_open(csv_file, capsys):
    # a straight climb: the best bounded sigmoid puts its upper asymptote on the ceiling 1
    rows = [{"run": i, "x": float(x), "acc": 0.3 + 0.06 * x} for i, x in enumerate(np.linspace(0, 10, 12))]
    res = run_study(StudyOptions([csv_file("lin.csv", rows)], form="sigmoid", columns={"x": "x", "y": "acc"}))
    assert res["params"]["hi"]["value"] == pytest.approx(1.0)
    assert any("sits on the ceiling 1" in w for w in res["warnings"])
    assert "high" in res["params"]["hi"]["open"]
    assert "sits on the ceiling" in capsys.readouterr().err


def test_sigmoid_never_overflows_far_from_its_midpoint():
    x = np.array([-1e4, -10, 0, 10, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = laws.sigmoid({"lo": 0.1, "hi": 0.9, "k": 50.0, "x0": 0.0}, x)
        f = fit_form("sigmoid", {"x": np.linspace(0, 1, 8), "y": np.array([0, 0, 0, 0, 1, 1, 1, 1.0])})   # a step
    assert y[0] == pytest.approx(0.1) and y[-1] == pytest.approx(0.9)
    assert 0 <= f.params["lo"] <= f.params["hi"] <= 1 and abs(f.params["k"]) > 20
    assert laws.sigmoid(f.params, np.array([0.0, 1.0])) == pytest.approx([0, 1], abs=1e-3)


def test_chinchilla_resamples_on_a_bound_are_counted_and_open_the_interval(csv_file, capsys):
    # E = 0: the irreducible loss sits on its lower bound exp(-10) in most resamples
    rows = []
    for n in np.geomspace(1e6, 1e9, 4):
        for d in np.geomspace(1e8, 1e11, 4):
            rows.append({"run": f"{n:g}-{d:g}", "N": n, "D": d, "loss": 406.4 / n**0.34 + 410.7 / d**0.28})
    res = run_study(StudyOptions([csv_file("e0.csv", rows)], form="chinchilla", bootstrap=40))
    e = res["params"]["E"]
    assert e["bound_hits"] >= 20 and "low" in e["open"] and e["ci95"][0] == pytest.approx(np.exp(-10))
    assert "resamples" in capsys.readouterr().err


def test_propagation_by_hand():
    # the loss interval maps to accuracies 0.55 and 0.65 around 0.6; the sigmoid's own interval is [0.57, 0.64]:
    # down = hypot(0.05, 0.03), up = hypot(0.05, 0.04)
    iv = propagate(0.6, (0.65, 0.55), Interval(0.57, 0.64, "profile likelihood"), 0.0, 1.0)
    assert iv.lo == pytest.approx(0.6 - np.hypot(0.05, 0.03)) and iv.hi == pytest.approx(0.6 + np.hypot(0.05, 0.04))
    assert propagate(0.95, (0.9, 1.0), Interval(0.9, 0.99, "p"), 0.0, 1.0).hi == 1.0   # clipped at the ceiling


def _downstream_rows(seed, n=16, noise_l=0.004, noise_a=0.01):
    rng = np.random.default_rng(seed)
    rows = []
    for i, c in enumerate(np.geomspace(1e17, 1e21, n)):
        loss = (50 * c**-0.08 + 1.7) * np.exp(rng.normal(0, noise_l))
        acc = 0.25 + 0.7 / (1 + np.exp(6.0 * (loss - 2.6))) + rng.normal(0, noise_a)
        rows.append({"run": f"r{i}", "C": c, "loss": loss, "acc": acc})
    return rows


def test_downstream_two_step_fit(csv_file, cli, tmp_path):
    from gentool.scaling.downstream import fit_downstream

    rows = _downstream_rows(0)
    loss_true = 50 * 1e22**-0.08 + 1.7
    acc_true = 0.25 + 0.7 / (1 + np.exp(6.0 * (loss_true - 2.6)))
    cols = {k: np.array([r[c] for r in rows]) for k, c in (("x", "C"), ("v", "loss"), ("y", "acc"))}
    r = fit_downstream(cols, [1e22], None)
    li, ai = r["ivs1"]["predict0.y"], r["pred_ivs"][0]
    assert li.lo <= loss_true <= li.hi and ai.lo <= acc_true <= ai.hi   # (coverage: bench/scale_fit.py)
    # the propagated interval is wider than the sigmoid's own at the predicted loss
    own = r["ivs2"]["predict0.y"]
    assert ai.lo < own.lo and ai.hi > own.hi and ai.method == "two-step propagation"
    path = csv_file("ds.csv", rows)
    r = cli("scale-fit", path, "--form", "downstream", "--predict", "C=1e22", "--holdout", "2", "--json",
            "-o", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    (pred,) = res["predictions"]
    assert pred["y"]["method"] == "two-step propagation" and pred["loss"]["method"] == "profile likelihood"
    assert res["params"]["acc.k"]["value"] < 0 and res["n_holdout"] == 2 and res["columns"]["v"] == "loss"
    h, summ = res["holdout"], res["holdout_summary"]
    assert {x["run"] for x in h} == {"r14", "r15"}   # the two largest computes
    assert summ["mean_rel_err"] == pytest.approx(np.mean([x["rel_err"] for x in h]))
    assert summ["bias"] == pytest.approx(np.mean([(x["predicted"] - x["actual"]) / x["actual"] for x in h]))
    assert (tmp_path / "ds" / "plot.png").stat().st_size > 5000
    r = cli("scale-fit", path, "--form", "downstream", "--y", "missing")
    assert r.exit_code == 2 and "no column 'missing'" in r.stderr


def test_an_open_interval_is_in_the_json_warnings_too(csv_file, cli):
    rows = [{"run": i, "x": float(x), "acc": 0.3 + 0.06 * x} for i, x in enumerate(np.linspace(0, 10, 12))]
    path = csv_file("lin.csv", rows)
    r = cli("scale-fit", path, "--form", "sigmoid", "--x", "x", "--y", "acc", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert "high" in res["params"]["hi"]["open"]
    want = "the 95% interval of hi reaches a parameter bound: its upper end is not determined by the data"
    assert want in res["warnings"] and want in r.stderr
