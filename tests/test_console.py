import io
import json
import re
import sys

from gentool import console


def test_emit_table_and_json(capsys):
    console.emit({"nll": 1.23456789, "tokens": 3, "kl": float("nan"), "parts": [1, 2]}, as_json=False, title="t")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "t" and out[1].split() == ["nll", "1.23457"] and out[3].split() == ["kl", "nan"]
    console.emit({"nll": 1.5, "kl": float("inf")}, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"nll": 1.5, "kl": None}  # no NaN/Inf in JSON


def test_logs_go_to_stderr_and_quiet_silences_them(capsys):
    console.log("working")
    console.warn("careful")
    captured = capsys.readouterr()
    assert captured.out == "" and "working" in captured.err and "warning: careful" in captured.err
    console.configure(quiet=True)
    console.log("working")
    console.warn("careful")
    assert capsys.readouterr().err == ""
    console.configure()


def test_debug_lines_need_verbose(capsys):
    console.debug("detail")
    assert capsys.readouterr().err == ""
    console.configure(verbose=1)
    console.debug("detail")
    assert "detail" in capsys.readouterr().err
    console.configure()


def test_progress_without_a_terminal_prints_plain_lines_and_leaves_stdout_alone(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    console.configure()
    with console.progress("training", 10, every=0) as bar:
        bar.update(advance=4, loss=2.5)
        sys.stdout.write("")  # stdout is never diverted
    assert re.search(r"training: 4/10  eta \d+m\d\ds  loss 2.5", err.getvalue())  # ETA from the rate so far


def test_quiet_silences_logs_but_never_errors(cli, tmp_path):
    r = cli("-q", "sample", tmp_path / "nope", "-p", "hi")
    assert r.exit_code == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.output
