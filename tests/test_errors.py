import pytest
import typer

from gentool.cli import app
from gentool.errors import GentoolError, UsageProblem


def test_one_line_with_path_and_hint():
    e = UsageProblem("output exists", path="runs/lm", hint="use --force to replace it")
    assert e.one_line() == "error: runs/lm: output exists; use --force to replace it"
    assert str(e) == "runs/lm: output exists; use --force to replace it"
    assert e.exit_code == 2 and GentoolError("x").exit_code == 1 and GentoolError("x", exit_code=130).exit_code == 130
    assert isinstance(e, ValueError)


@pytest.fixture
def failing_command():
    """A throwaway command that raises what it is told to, registered for one test."""
    def boom(kind: str = typer.Option("gentool")) -> None:
        raise {"gentool": GentoolError("bad data", path="x.bin", hint="re-create it"),
               "usage": UsageProblem("bad option"), "bug": RuntimeError("oops"),
               "interrupt": KeyboardInterrupt()}[kind]
    app.command("boom-for-test")(boom)
    yield
    app.registered_commands.pop()


@pytest.mark.parametrize("kind, code, words", [("gentool", 1, "error: x.bin: bad data; re-create it"),
                                               ("usage", 2, "error: bad option"),
                                               ("bug", 1, "error: internal error: RuntimeError: oops"),
                                               ("interrupt", 130, "error: interrupted")])
def test_cli_turns_errors_into_one_line_and_an_exit_code(cli, failing_command, kind, code, words):
    r = cli("boom-for-test", "--kind", kind)
    assert r.exit_code == code
    assert r.stderr.strip() == words or r.stderr.strip().startswith(words)
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_debug_shows_the_traceback(cli, failing_command):
    r = cli("--debug", "boom-for-test", "--kind", "gentool")
    assert r.exit_code != 0 and isinstance(r.exception, GentoolError)
