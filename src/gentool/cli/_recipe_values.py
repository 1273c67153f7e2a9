"""Values crossing between a command line and a recipe: what a recipe may give an option (its type, checked before
click converts it: click would read TOML `lr = true` as 1.0 and `steps = 2.5` as 2), and what a manifest records of
what a command was given (paths absolute, so a recorded invocation repeats from any directory)."""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Any

from gentool.errors import UsageProblem

_TYPES = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
          str: (str, "a string"), Path: (str, "a path (a string)")}


def check_type(what: str, key: str, value: Any, param: Any, path: Path) -> None:
    """A recipe's value must have the option's type: TOML `lr = true` is not a float (click would make it 1.0),
    `steps = 2.5` not an integer, `steps = [1]` not a number."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    args = typing.get_args(annotation)
    listed = getattr(param, "multiple", False) or param.nargs == -1
    kind = args[0] if listed and args else annotation
    if kind not in _TYPES:  # a type recipes cannot spell (none today): left to the option's own conversion
        return
    accepted, words = _TYPES[kind]
    for v in value if listed else [value]:
        if isinstance(v, bool) != (kind is bool) or not isinstance(v, accepted):
            raise UsageProblem(f"{what} {key!r} in the recipe must be {words}{', or a list of them' if listed else ''}"
                               f", not {type(v).__name__} {json.dumps(v, default=str)[:40]}", path=path,
                               hint="fix its value in the recipe")


def recorded_value(value: Any, *, positional: bool = False) -> Any:
    """A value as the manifest records it: paths absolute, so `--config RUN/manifest.json` repeats the run from any
    directory. A positional string that names an existing file or directory (train-diffusion's DATA, tokenize's
    inputs) is a path too; other strings ("builtin:moons", "-", an option's "tiny") stay as typed."""
    if isinstance(value, Path):
        return value.as_posix() if str(value) == "-" else os.path.abspath(value)
    if isinstance(value, (list, tuple)):
        return [recorded_value(v, positional=positional) for v in value]
    if positional and isinstance(value, str) and value not in ("", "-") and os.path.exists(value):
        return os.path.abspath(value)
    return value
