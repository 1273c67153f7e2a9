"""Every command documents itself: help with an example, man pages in sync, module size budgets."""

import subprocess
import sys
from pathlib import Path

import typer

from gentool.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _leaf_commands():
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + [name])
        elif path:
            out.append((path, cmd))

    walk(root, [])
    return out


def test_every_command_has_summary_and_example(cli):
    for path, cmd in _leaf_commands():  # empty until a command is registered
        summary = (cmd.help or "").strip().splitlines()[0]
        assert 0 < len(summary) <= 70, (path, summary)
        assert cmd.epilog and "Examples:" in cmd.epilog and "gentool " in cmd.epilog, path
        result = cli(*path, "--help")
        assert result.exit_code == 0, (path, result.output)


def test_root_help_and_usage_errors(cli):
    assert cli("--help").exit_code == 0
    result = cli("no-such-command")
    assert result.exit_code == 2


def test_man_pages_are_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_man.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_module_size_budgets():
    limits = {"cli": 150, "models": 400}
    offenders = []
    for f in (ROOT / "src" / "gentool").rglob("*.py"):
        n = len(f.read_text().splitlines())
        limit = limits.get(f.parent.name, 600)
        if f.name == "__init__.py" and f.parent.name == "cli":
            limit = 150
        if n > limit:
            offenders.append(f"{f.relative_to(ROOT)}: {n} > {limit}")
    assert not offenders, offenders
