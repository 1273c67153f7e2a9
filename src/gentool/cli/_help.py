"""Help text that reads well at any width: paragraphs reflow, flags are never split, brackets are words."""

from __future__ import annotations

import inspect
import re
from typing import Any

_KEEP_LINE = re.compile(r"\s|[-*•] |\d+[.)] ")  # a list item or an indented line keeps its line break


def reflow(text: str | None) -> str | None:
    """Help text whose paragraphs reflow at any terminal width: the lines of a paragraph are joined (source
    docstrings are wrapped for the editor, not the reader), list items and indented lines keep their breaks, and a
    paragraph that starts with \\b (Click's "do not rewrap") is kept as it is."""
    if not text:
        return text
    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        if para.startswith("\b"):
            out.append(para)
            continue
        merged = [lines[0]]
        for line in lines[1:]:
            if _KEEP_LINE.match(line):
                merged.append(line)
            else:
                merged[-1] = f"{merged[-1].rstrip()} {line.strip()}"
        out.append("\n".join(merged))
    return "\n\n".join(out)


def no_hyphen_breaks() -> None:
    """Click wraps help text with textwrap, which breaks lines after hyphens: "--max-new-" / "tokens". A flag is
    one word to the reader (and to copy and paste), so lines break at spaces only."""
    from typer._click import _textwrap

    base = _textwrap.TextWrapper
    if not getattr(base, "gentool_no_hyphen_breaks", False):
        class Wrapper(base):  # type: ignore[valid-type, misc]
            gentool_no_hyphen_breaks = True

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**kwargs, "break_on_hyphens": False})

        _textwrap.TextWrapper = Wrapper


def plain_help(command: Any) -> None:
    """Every command's and option's help reflowed, and shown as plain text: brackets such as [arguments] are words,
    not Rich markup."""
    command.rich_markup_mode = None
    command.help = reflow(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = reflow(param.help)
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
