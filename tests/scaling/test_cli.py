"""`gentool scale-fit` end to end: synthetic CSV, stdin, fake gentool run directories, errors."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from gentool.artifacts import read_artifact

_spec = importlib.util.spec_from_file_location("_scaling_synth", Path(__file__).with_name("_synth.py"))
_synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synth)
_io_spec = importlib.util.spec_from_file_location("_scaling_test_io", Path(__file__).with_name("test_io.py"))
_io = importlib.util.module_from_spec(_io_spec)
_io_spec.loader.exec_module(_io)


def test_cli_on_a_synthetic_csv(tmp_path, cli):
    path = _synth.write_csv(tmp_path / "runs.csv", _synth.chinchilla_rows(0, sizes=4, budgets=4))
    r = cli("scale-fit", path, "--form", "chinchilla", "--holdout", "1", "--predict", "C=1e21", "--bootstrap", "20",
            "-o", tmp_path / "fit")
    assert r.exit_code == 0, r.output
    assert "alpha" in r.stdout and "predict C=1e+21: loss" in r.stdout and "holdout n1e+09-d1e+11" in r.stdout
    m = read_artifact(tmp_path / "fit", "scale-fit")
    assert m.contents["form"] == "chinchilla" and m.contents["n_holdout"] == 1
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit["params"]["alpha"]["ci95"] and len(fit["data"]) == 16 and fit["sources"][0]["path"] == path
    assert sum(d["held_out"] for d in fit["data"]) == 1 and all("residual" in d for d in fit["data"])
    rows = list(csv.DictReader((tmp_path / "fit" / "predictions.csv").read_text().splitlines()))
    assert {r["quantity"] for r in rows if r["kind"] == "predict"} == {"N", "D", "loss"}
    assert [r["kind"] for r in rows].count("holdout") == 1
    assert (tmp_path / "fit" / "plot.png").stat().st_size > 5000
    r = cli("scale-fit", path, "--form", "chinchilla", "-o", tmp_path / "fit", "--bootstrap", "0")
    assert r.exit_code == 2 and "exists" in r.output   # no --force: the artifact stays


def test_cli_stdin_json_and_strict(tmp_path, cli):
    rows = _synth.power_rows(0)
    text = "\n".join(json.dumps({"flops": r["C"], "val": r["loss"]}) for r in rows) + "\n{\"flops\": 1e15}\n"
    r = cli("scale-fit", "-", "--x", "flops", "--y", "val", "--predict", "X=1e20", "--bootstrap", "10", "--json",
            input=text)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["params"]["b"]["value"] == pytest.approx(-0.3, abs=0.02) and res["skipped"] == 1
    assert "skipped -:21: missing or non-numeric 'val'" in r.stderr
    r = cli("scale-fit", "-", "--x", "flops", "--y", "val", "--strict", input=text)
    assert r.exit_code == 1 and "1 malformed rows" in r.stderr
    r = cli("scale-fit", "-", "--form", "chinchilla", input=text)   # one message naming the columns there are
    assert r.exit_code == 2 and "no column 'N'; the columns are: flops, val" in r.stderr
    assert r.stderr.count("\n") == 1 and "warning" not in r.stderr
    r = cli("scale-fit", "-", "--form", "chinchilla", "--n", "flops", "--d", "flops", "--y", "val", "--filter",
            "flops<1e13", input=text)
    assert r.exit_code == 2 and "needs at least 6 points" in r.stderr


def test_cli_on_gentool_run_dirs(tmp_path, cli):
    runs = tmp_path / "runs"
    for i, (n, d) in enumerate([(1e6, 1e8), (2e6, 1e8), (4e6, 2e8), (8e6, 4e8), (1.6e7, 8e8), (3.2e7, 1.6e9)]):
        _io.make_run(runs, f"run{i}", n, d, 2 + 20 * (6 * n * d) ** -0.1)
    _io.make_run(runs, "run9", 6.4e7, 3.2e9, 9.9, evals=((1.0, 9.9),), partial=True)   # unfinished
    r = cli("scale-fit", str(runs / "run*"), "--holdout", "1", "--predict", "C=1e20", "-o", tmp_path / "fit",
            "--bootstrap", "20", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["params"]["b"]["value"] == pytest.approx(-0.1, abs=1e-3)
    (h,) = res["holdout"]
    assert h["run"] == str(runs / "run9") and h["actual"] == 9.9   # the largest run by compute is the partial one
    r = cli("scale-fit", str(runs / "run[0-5]"), "--holdout", "1", "--bootstrap", "0", "--json")
    (h,) = json.loads(r.stdout)["holdout"]
    assert h["run"] == str(runs / "run5") and h["rel_err"] < 1e-3
    m = read_artifact(tmp_path / "fit", "scale-fit")
    assert {i["path"] for i in m.inputs} >= {str(runs / "run0"), str(runs / "run9.partial")}


def test_cli_without_matplotlib(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "gentool.scaling.plot", raising=False)
    path = _synth.write_csv(tmp_path / "p.csv", _synth.power_rows(1))
    r = cli("scale-fit", path, "--bootstrap", "0", "-o", tmp_path / "fit")
    assert r.exit_code == 0, r.output
    assert "matplotlib is not installed" in r.stderr and "gentool[plot]" in r.stderr
    assert (tmp_path / "fit" / "fit.json").is_file() and not (tmp_path / "fit" / "plot.png").exists()


@pytest.mark.parametrize("form, extra", [("power", []), ("isoflop", ["--n", "N"]), ("sigmoid", ["--x", "C"])])
def test_cli_plots_every_form(tmp_path, cli, form, extra):
    if form == "isoflop":
        rows = [{"run": f"{c}-{f}", "N": 0.1 * c**0.5 * f, "C": c, "loss": 2 + 0.05 * (f - 1) ** 2 + c**-0.05}
                for c in (1e15, 1e16, 1e17) for f in (0.25, 0.5, 1, 2, 4)]
    elif form == "sigmoid":
        rows = [{"run": i, "C": x, "loss": 0.3 + 0.6 / (1 + 2.7 ** (3 * (x - 2.5)))}
                for i, x in enumerate([1 + 0.2 * k for k in range(16)])]
    else:
        rows = _synth.power_rows(2)
    path = _synth.write_csv(tmp_path / "d.csv", rows)
    r = cli("scale-fit", path, "--form", form, *extra, "--bootstrap", "12", "--predict", "C=1e18" if form != "sigmoid"
            else "X=4.5", "-o", tmp_path / "fit")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fit" / "plot.png").stat().st_size > 5000


def test_a_file_without_the_x_column_is_skipped_beside_others(tmp_path, cli):
    good = _synth.write_csv(tmp_path / "good.csv", _synth.power_rows(0))
    other = _synth.write_csv(tmp_path / "other.csv", [{"run": "z", "flops": 1e15, "loss": 3.0}])
    r = cli("scale-fit", good, other, "--form", "power", "--bootstrap", "0", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["skipped"] == 1 and res["n_points"] == 20 and [s["path"] for s in res["sources"]] == [good]
    assert f"skipped {other}: no column 'C'; the columns are: flops, loss, run; file skipped" in r.stderr
    r = cli("scale-fit", good, other, "--form", "power", "--strict")          # --strict refuses, as for rows
    assert r.exit_code == 1 and "malformed" in r.stderr
    r = cli("scale-fit", other, other, "--form", "power")                    # no input has it: refused
    assert r.exit_code == 2 and "no column 'C'" in r.stderr


def test_tables_never_print_none(tmp_path, cli):
    # isoflop has no rmse (its law predicts N_opt, not the loss): the table shows a dash, not Python's None
    rows = []
    for c in (1e15, 1e16, 1e17):
        for f in (0.25, 0.5, 1, 2, 4):
            n = 0.1 * c**0.5 * f
            rows.append({"run": f"{c:g}-{f}", "N": n, "C": c, "loss": 2 + 30 * c**-0.1 + 0.05 * (f - 1) ** 2})
    r = cli("scale-fit", _synth.write_csv(tmp_path / "iso.csv", rows), "--form", "isoflop", "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    assert "None" not in r.stdout and any(line.split()[:2] == ["rmse", "—"] for line in r.stdout.splitlines())
