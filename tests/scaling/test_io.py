"""Readers of scaling data: CSV / JSON lines with column mapping and filters, gentool run directories."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gentool.errors import GentoolError, UsageProblem
from gentool.scaling.io import _llama_params, read_table

XY = {"x": "C", "y": "loss"}


def make_run(root, name, n, d, loss, *, evals=((0.5, None), (1.0, None)), n_total=None, partial=False):
    """A gentool train-lm run directory: manifest.json (unless partial) and metrics.jsonl."""
    run = root / (name + (".partial" if partial else ""))
    run.mkdir(parents=True)
    lines = []
    for frac, val in evals:
        rec = {"step": int(100 * frac), "tokens": d * frac, "flops": 6 * n * d * frac, "loss": loss + 0.1 / frac,
               "lr": 1e-3, "grad_norm": 0.5, "seconds": frac}
        if val is not None:
            rec["val_loss"] = val
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if partial:
        (run / "run.json").write_text(json.dumps({"model": {"hidden_size": 48, "num_hidden_layers": 2,
                                                            "intermediate_size": 128, "vocab_size": 1024,
                                                            "num_attention_heads": 4, "num_key_value_heads": 4,
                                                            "head_dim": 12}, "train": {"seed": 3}}))
    else:
        (run / "manifest.json").write_text(json.dumps({
            "format": "gentool.lm-checkpoint", "format_version": 1, "config": {"train": {"seed": 0}},
            "contents": {"n_params": n_total or 2 * n, "n_params_non_embedding": n, "tokens_seen": d,
                         "train_flops": 6 * n * d},
            "metrics": {"train_loss": loss + 0.1, "val_loss": loss}}))
    return run


def test_csv_and_jsonl_with_mapping_filters_and_reasons(tmp_path):
    (tmp_path / "a.csv").write_text("name,flops,val,tag\nr1,1e15,3.0,x\nr2,abc,2.9,x\nr3,-1,2.8,x\nr4,1e17,nan,x\n"
                                    "r5,1e18,2.5,y\nr6,1e19,\n")
    t = read_table([str(tmp_path / "a.csv")], {"x": "flops", "y": "val"}, positive=("x", "y"))
    assert [p.run for p in t.points] == ["r1", "r5"]
    reasons = "\n".join(t.skipped)
    assert f"{tmp_path / 'a.csv'}:3: missing or non-numeric 'flops'" in reasons
    assert ":4: 'flops' must be positive, got -1" in reasons and ":5: 'val' is nan" in reasons
    assert ":7: missing or non-numeric 'val'" in reasons and len(t.skipped) == 4
    t = read_table([str(tmp_path / "a.csv")], {"x": "flops", "y": "val"}, filters=["tag=y"], positive=("x",))
    assert [p.run for p in t.points] == ["r5"]
    t = read_table([str(tmp_path / "a.csv")], {"x": "flops", "y": "val"}, filters=["flops<=1e16"])
    assert [p.run for p in t.points] == ["r1", "r3"]
    (tmp_path / "b.jsonl").write_text('{"C": 1e15, "loss": 3}\n[1, 2]\n{"C": 2e15\n\n{"C": 3e15, "loss": 2.9}\n')
    t = read_table([str(tmp_path / "b.jsonl")], XY)
    assert len(t.points) == 2 and t.points[1].values == {"x": 3e15, "y": 2.9}
    assert any(":2: not a JSON object" in s for s in t.skipped) and any(":3: invalid JSON" in s for s in t.skipped)


def test_stdin_globs_and_missing_inputs(tmp_path, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("C,loss\n1,2\n2,1.5\n"))
    assert len(read_table(["-"], XY).points) == 2
    for i in range(3):
        (tmp_path / f"p{i}.csv").write_text(f"C,loss\n{i + 1},2\n")
    assert len(read_table([str(tmp_path / "p*.csv")], XY).points) == 3
    with pytest.raises(UsageProblem, match="no such file"):
        read_table([str(tmp_path / "nothing*")], XY)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UsageProblem, match="not a gentool run directory"):
        read_table([str(tmp_path / "emptydir")], XY)
    (tmp_path / "nul.csv").write_text("C,loss\n1,\"" + "9" * 200_000 + "\"\n")   # over csv's field limit
    with pytest.raises(GentoolError, match="not a valid CSV"):
        read_table([str(tmp_path / "nul.csv")], XY)


def test_run_directories(tmp_path):
    make_run(tmp_path, "a", 1e6, 1e8, 3.0, evals=((0.5, 3.5), (1.0, 3.1)))
    make_run(tmp_path, "b", 2e6, 1e8, 2.8, n_total=5e6)
    cols = {"n": "N", "d": "D", "c": "C", "y": "loss"}
    t = read_table([str(tmp_path / "*")], cols)
    a, b = t.points
    assert a.values == {"n": 1e6, "d": 1e8, "c": 6e14, "y": 3.0} and b.values["y"] == 2.8
    assert read_table([str(tmp_path / "b")], {"n": "N_total", "y": "loss"}).points[0].values["n"] == 5e6
    assert read_table([str(tmp_path / "b")], {"n": "N", "y": "train_loss"}).points[0].values["y"] == pytest.approx(2.9)
    # --point all: every evaluation of a run (b logged none); --y train_loss: every logged step
    t = read_table([str(tmp_path / "a"), str(tmp_path / "b")], cols, point="all")
    assert [p.values["y"] for p in t.points] == [3.5, 3.1] and [p.values["d"] for p in t.points] == [5e7, 1e8]
    assert t.skipped == [f"{tmp_path / 'b'}: no evaluation logged yet (--y train_loss uses the training loss)"]
    t = read_table([str(tmp_path / "a"), str(tmp_path / "b")], {"d": "D", "y": "train_loss"}, point="all")
    assert [p.values["y"] for p in t.points] == pytest.approx([3.2, 3.1, 3.0, 2.9]) and not t.skipped
    (t_min,) = read_table([str(tmp_path / "a")], cols, point="min").points
    assert t_min.values["y"] == 3.1
    assert [p.run for p in read_table([str(tmp_path / "*")], cols, filters=["run=b"]).points] == [str(tmp_path / "b")]
    with pytest.raises(UsageProblem, match="no column 'acc'; the columns are: .*N_total.*val_loss"):
        read_table([str(tmp_path / "*")], {"x": "C", "y": "acc"})   # one error, not one skip per run
    # --best-of works on the recipe's columns of run directories (lr, schedule, ...)
    assert len(read_table([str(tmp_path / "*")], cols, best_of="seed").points) == 2


def test_unfinished_runs(tmp_path):
    make_run(tmp_path, "c", 55536, 1e6, 4.0, evals=((0.3, None), (0.6, 4.2)), partial=True)
    (p,) = read_table([str(tmp_path / "c.partial")], {"n": "N", "d": "D", "y": "loss"}).points
    assert p.values == {"n": 55536, "d": 6e5, "y": 4.2} and p.run == str(tmp_path / "c")
    assert _llama_params({"hidden_size": 48, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 1024,
                          "num_attention_heads": 4}) == (55536, 153840)   # train-lm's own counts for this config
    make_run(tmp_path, "c", 55536, 1e6, 3.9)   # finished: the .partial next to it is ignored
    t = read_table([str(tmp_path / "c*")], {"n": "N", "y": "loss"})
    assert [p.values["y"] for p in t.points] == [3.9] and "unfinished copy" in t.skipped[0]


def _fuzz_value():
    return st.one_of(st.floats(), st.text(max_size=5), st.integers(min_value=-10**30, max_value=10**30), st.none(),
                     st.booleans(), st.lists(st.integers(), max_size=2))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=40), st.dictionaries(st.sampled_from(["C", "loss", "run", "x"]),
                                                                _fuzz_value(), max_size=4).map(json.dumps)),
                max_size=12), st.booleans())
def test_fuzz_table_readers_never_crash(tmp_path_factory, lines, as_csv):
    path = tmp_path_factory.mktemp("fz") / ("log.csv" if as_csv else "log.jsonl")
    text = "\n".join(lines)
    path.write_text(("C,loss\n" + text) if as_csv else text)
    try:
        t = read_table([str(path)], XY, positive=("x", "y"), filters=["C>0"])
    except (GentoolError, UsageProblem):
        return
    for p in t.points:
        assert p.values["x"] > 0 and p.values["y"] > 0 and np.isfinite([p.values["x"], p.values["y"]]).all()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=60), st.recursive(_fuzz_value(), lambda c: st.dictionaries(
    st.sampled_from(["contents", "metrics", "config", "n_params", "n_params_non_embedding", "tokens_seen",
                     "train_flops", "val_loss", "train"]), c, max_size=4), max_leaves=8).map(json.dumps)),
       st.lists(st.one_of(st.text(max_size=30), st.dictionaries(st.sampled_from(["tokens", "flops", "loss",
                                                                                 "val_loss", "step"]),
                                                                _fuzz_value(), max_size=5).map(json.dumps)),
                max_size=6),
       st.sampled_from(["final", "min", "all"]), st.booleans())
def test_fuzz_run_dirs_never_crash(tmp_path_factory, manifest, metrics, point, partial):
    run = tmp_path_factory.mktemp("runs") / ("r.partial" if partial else "r")
    run.mkdir()
    (run / ("run.json" if partial else "manifest.json")).write_text(manifest)
    (run / "metrics.jsonl").write_text("\n".join(metrics))
    try:
        t = read_table([str(run)], {"n": "N", "d": "D", "y": "loss"}, point=point, positive=("n", "d", "y"))
    except (GentoolError, UsageProblem) as e:
        assert str(run) in str(getattr(e, "path", "")) or "manifest" in str(e) or "run" in str(e)
        return
    for p in t.points:
        assert min(p.values.values()) > 0 and np.isfinite(list(p.values.values())).all()
