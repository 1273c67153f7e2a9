"""--help reads well at any width: paragraphs reflow, flags are never split, brackets are words, not markup."""

import re

import pytest
import typer.main
from typer.testing import CliRunner

from gentool.cli import app
from gentool.cli._help import reflow


def _commands(cmd, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = [c for c in _commands(typer.main.get_command(app)) if c[0]]


@pytest.mark.parametrize("width", [80, 200])
def test_every_flag_and_bracketed_word_survives_at_any_width(width):
    runner = CliRunner()
    for path, cmd in COMMANDS:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(width), "NO_COLOR": "1"},
                          terminal_width=width)
        assert r.exit_code == 0, (path, r.output)
        out = r.output
        words = set(re.findall(r"\S+", out))
        prose = re.split(r"\n *Examples:\n", out)[0]  # examples are commands to copy: kept whole
        assert max(len(line) for line in prose.splitlines()) <= width, path
        for p in cmd.params:
            for flag in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]:
                if flag.startswith("-"):
                    assert any(w.strip(",.;:()") == flag for w in words), (path, flag, width)
        source = " ".join([cmd.help or "", *(getattr(p, "help", None) or "" for p in cmd.params)])
        for bracketed in re.findall(r"\[[A-Za-z][\w-]*\]", source):
            assert bracketed in out, (path, bracketed, width)
        assert "None" not in re.findall(r"\b\w+\b", out), path


def test_paragraph_lines_are_joined_but_lists_and_verbatim_blocks_keep_their_breaks():
    text = """First line.

    A paragraph wrapped
    for the editor.

    - an item
    - another item
      indented continuation

    \b
    kept
    as is"""
    assert reflow(text) == ("First line.\n\nA paragraph wrapped for the editor.\n\n- an item\n- another item\n"
                            "  indented continuation\n\n\b\nkept\nas is")
    assert reflow(None) is None and reflow("") == ""
