import csv
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gentool.errors import GentoolError, UsageProblem
from gentool.scaling.io import read_table
from gentool.scaling.study import StudyOptions, run_study


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _power_rows(seed, a=1e4, b=-0.3, c=1.8, noise=0.003):
    rng = np.random.default_rng(seed)
    xs = np.geomspace(1e12, 1e18, 24)
    return [{"run": f"r{i}", "C": x, "loss": (a * x**b + c) * np.exp(rng.normal(0, noise))} for i, x in enumerate(xs)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_recovered_within_cis(tmp_path, seed):
    res = run_study(StudyOptions([_csv(tmp_path / "p.csv", _power_rows(seed))], form="power", bootstrap=40,
                                 seed=seed))
    p = res["params"]
    for name, true in (("b", -0.3), ("c", 1.8)):
        lo, hi = p[name]["ci95"]
        assert lo <= true <= hi, (name, p[name])


@pytest.mark.parametrize("seed", [0, 1])
def test_chinchilla_recovered_within_cis(tmp_path, seed):
    rng = np.random.default_rng(seed)
    E, A, B, al, be = 1.69, 406.4, 410.7, 0.34, 0.28
    rows = []
    for n in np.geomspace(1e6, 1e9, 6):
        for d in np.geomspace(1e8, 1e11, 6):
            rows.append({"run": f"{n:.0f}-{d:.0f}", "N": n, "D": d,
                         "loss": (E + A / n**al + B / d**be) * np.exp(rng.normal(0, 0.0005))})
    res = run_study(StudyOptions([_csv(tmp_path / "c.csv", rows)], form="chinchilla", bootstrap=40, seed=seed,
                                 predict=["C=1e21"]))
    p = res["params"]
    for name, true in (("alpha", al), ("beta", be), ("E", E)):
        lo, hi = p[name]["ci95"]
        assert lo <= true <= hi, (name, p[name])
    assert abs(p["a"]["value"] - be / (al + be)) < 0.03
    pred = res["predictions"][0]
    assert pred["N"]["value"] * pred["D"]["value"] * 6 == pytest.approx(1e21, rel=1e-6)


def test_isoflop_and_sigmoid(tmp_path):
    rows = []
    for c in (1e15, 1e16, 1e17):
        nopt = 0.1 * c**0.5
        for f in (0.25, 0.5, 1, 2, 4):
            n = nopt * f
            rows.append({"run": f"{c}-{f}", "N": n, "C": c, "loss": 2 + 0.1 * np.log(f) ** 2 + 10 * c**-0.1})
    res = run_study(StudyOptions([_csv(tmp_path / "i.csv", rows)], form="isoflop", bootstrap=0))
    assert res["params"]["m"]["value"] == pytest.approx(0.5, abs=0.01)
    x = np.linspace(1.5, 4, 30)
    srows = [{"run": i, "nll": v, "acc": 0.25 + 0.7 / (1 + np.exp(4 * (v - 2.5)))} for i, v in enumerate(x)]
    res = run_study(StudyOptions([_csv(tmp_path / "s.csv", srows)], form="sigmoid", columns={"x": "nll", "y": "acc"},
                                 bootstrap=0))
    assert res["params"]["x0"]["value"] == pytest.approx(2.5, abs=1e-3)


def test_row_order_invariance(tmp_path):
    rows = _power_rows(0)
    a = run_study(StudyOptions([_csv(tmp_path / "a.csv", rows)], bootstrap=20))
    b = run_study(StudyOptions([_csv(tmp_path / "b.csv", rows[::-1])], bootstrap=20))
    assert a["params"] == b["params"]


def test_holdout_arithmetic_by_hand(tmp_path):
    # exact power law: the fit recovers it, so the held-out prediction is the law's value at the largest x
    rows = [{"run": i, "C": x, "loss": 10 * x**-0.5 + 1} for i, x in enumerate([1, 4, 16, 64, 256, 1024])]
    res = run_study(StudyOptions([_csv(tmp_path / "h.csv", rows)], bootstrap=0, holdout=1))
    (h,) = res["holdout"]
    assert h["run"] == "5" and h["actual"] == pytest.approx(10 / 32 + 1)
    assert h["predicted"] == pytest.approx(1.3125, rel=1e-4)
    assert h["abs_err"] == pytest.approx(abs(h["predicted"] - h["actual"]))
    assert h["rel_err"] == pytest.approx(h["abs_err"] / h["actual"])


def test_malformed_rows_skipped_or_refused(tmp_path):
    rows = _power_rows(0) + [{"run": "bad1", "C": "abc", "loss": 2}, {"run": "bad2", "C": -5, "loss": 2},
                             {"run": "bad3", "C": 1e15, "loss": "nan"}]
    path = _csv(tmp_path / "m.csv", rows)
    t = read_table([path], {"x": "C", "y": "loss"}, positive=("x", "y"))
    assert len(t.points) == 24 and len(t.skipped) == 3
    assert any("must be positive" in s for s in t.skipped) and any("non-numeric" in s for s in t.skipped)
    with pytest.raises(GentoolError, match="3 malformed rows"):
        run_study(StudyOptions([path], strict=True, bootstrap=0))
    with pytest.raises(UsageProblem, match="needs at least 6 points"):
        run_study(StudyOptions([_csv(tmp_path / "f.csv", _power_rows(0)[:3])], form="chinchilla",
                               columns={"n": "C", "d": "C"}))


def test_cli_on_gentool_run_dirs(tmp_path, cli):
    for i, (n, d) in enumerate([(1e6, 1e8), (2e6, 1e8), (4e6, 2e8), (8e6, 4e8), (1.6e7, 8e8), (3.2e7, 1.6e9)]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        loss = 2 + 20 * (6 * n * d) ** -0.1
        (run / "manifest.json").write_text(json.dumps({
            "format": "gentool.lm-checkpoint", "format_version": 1,
            "contents": {"n_params_non_embedding": n, "tokens_seen": d, "train_flops": 6 * n * d},
            "metrics": {"val_loss": loss}}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": d, "flops": 6 * n * d, "loss": loss,
                                                       "val_loss": loss}) + "\n")
    r = cli("scale-fit", str(tmp_path / "run*"), "--holdout", "1", "--predict", "C=1e20", "-o", tmp_path / "fit",
            "--bootstrap", "20", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["params"]["b"]["value"] == pytest.approx(-0.1, abs=1e-3) and res["holdout"][0]["rel_err"] < 1e-3
    assert (tmp_path / "fit" / "fit.json").is_file() and (tmp_path / "fit" / "predictions.csv").is_file()
    assert (tmp_path / "fit" / "plot.png").stat().st_size > 1000
    r = cli("scale-fit", str(tmp_path / "nothing*"))
    assert r.exit_code == 2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=40), st.dictionaries(st.sampled_from(["C", "loss", "run", "x"]),
                                                                st.one_of(st.floats(), st.text(max_size=5),
                                                                          st.integers(), st.none()), max_size=4)
                          .map(json.dumps)), max_size=12))
def test_fuzz_readers_never_crash(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fz") / "log.jsonl"
    path.write_text("\n".join(lines))
    try:
        t = read_table([str(path)], {"x": "C", "y": "loss"}, positive=("x", "y"))
    except (GentoolError, UsageProblem):
        return
    for p in t.points:
        assert p.values["x"] > 0 and np.isfinite(p.values["y"])
