"""Recipes in files: `--config FILE` gives a command its options, and every command records what it was asked.

FILE is a TOML recipe whose keys are the command's flag names (`hidden-size = 128` or `hidden_size = 128`; a
positional argument goes in an `[arguments]` table under its name), or an artifact's manifest.json (or the
artifact directory), whose `invocation` section holds the arguments and options of the run that made it, so
`--config runs/lm/manifest.json -o runs/lm2` repeats that run exactly. Flags given on the command line win.

The invocation (`{"command", "arguments", "options"}`) is set for the duration of each command and written by
`gentool.artifacts` into every manifest the command creates.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from gentool.cli._recipe_values import check_type, recorded_value
from gentool.errors import UsageProblem

try:  # typer >= 0.26 vendors its own click
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import get_current_context

NOT_RECORDED = ("config", "force", "resume")   # how to run, not what to run


def _flag(param: Any) -> str:
    """An option's key: its longest --name without dashes (`--tokens` -> "tokens", `-o/--output` -> "output")."""
    longs = [o for o in param.opts if o.startswith("--")] or param.opts
    return max(longs, key=len).lstrip("-")


def _keys(command: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(option key -> param, argument name -> param) of a click command."""
    options, arguments = {}, {}
    for p in command.params:
        if p.name in NOT_RECORDED or getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            arguments[p.name] = p
        elif p.opts and p.opts[0].startswith("-") and not p.is_eager:
            options[_flag(p)] = p
    return options, arguments


def command_name(ctx: Any) -> str:
    """"train-lm", "tokenize encode": the command's words after `gentool`."""
    words = []
    while ctx.parent is not None:
        words.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(words))


def _read_table(path: Path, command: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arguments, options) from a TOML recipe or an artifact's recorded invocation."""
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise UsageProblem("no such recipe file", path=path, hint="pass a .toml recipe or an artifact's manifest.json")
    if path.suffix == ".json":
        try:
            inv = json.loads(path.read_text(encoding="utf-8")).get("invocation")
        except (OSError, ValueError, AttributeError) as e:
            raise UsageProblem(f"cannot read the manifest ({e})", path=path) from None
        if not isinstance(inv, dict) or not inv.get("command"):
            raise UsageProblem("the manifest records no invocation (made by an older gentool?)", path=path,
                               hint="pass a TOML recipe instead")
        if inv["command"] != command:
            raise UsageProblem(f"the manifest was written by `gentool {inv['command']}`, not `gentool {command}`",
                               path=path, hint=f"pass a manifest of a {command} run, or a TOML recipe")
        arguments, options = inv.get("arguments") or {}, inv.get("options") or {}
        if not isinstance(arguments, dict) or not isinstance(options, dict):
            raise UsageProblem("the manifest's invocation is malformed (arguments and options must be tables)",
                               path=path, hint="pass a TOML recipe instead")
        return dict(arguments), dict(options)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageProblem(f"not a valid TOML recipe ({e})", path=path) from None
    arguments = table.pop("arguments", {})
    if not isinstance(arguments, dict):
        raise UsageProblem("[arguments] must be a table", path=path)
    return arguments, table


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """The eager --config callback: the file's values become this command's defaults (ctx.default_map)."""
    if value is None or ctx.resilient_parsing:
        return value
    arguments, options = _read_table(Path(value), command_name(ctx))
    known_options, known_arguments = _keys(ctx.command)
    defaults: dict[str, Any] = {}
    for table, known, what in ((options, known_options, "option"), (arguments, known_arguments, "argument")):
        for key, v in table.items():
            p = known.get(key) or known.get(str(key).replace("_", "-"))
            if p is None:
                raise UsageProblem(f"unknown {what} {key!r} in the recipe", path=value,
                                   hint=f"`gentool {command_name(ctx)}` takes: " + ", ".join(sorted(known)))
            if v is None:
                continue
            if getattr(p, "multiple", False) or p.nargs == -1:
                v = list(v) if isinstance(v, (list, tuple)) else [v]
            check_type(what, key, v, p, value)
            defaults[p.name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


Config = Annotated[Optional[Path], typer.Option(
    "--config", is_eager=True, callback=load_config, metavar="FILE",
    help="Take options from a TOML recipe (keys are flag names; positional arguments in an [arguments] table) or "
         "from an artifact's manifest.json, which repeats the run that made it. Command-line flags win.")]


def recorded(fn: Callable) -> Callable:
    """Wrap a command so that, while it runs, artifacts record its resolved arguments and options."""
    from gentool.artifacts import INVOCATION

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = get_current_context(silent=True)
        if ctx is None:
            return fn(*args, **kwargs)
        options, arguments = _keys(ctx.command)
        inv = {"command": command_name(ctx),
               "arguments": {k: recorded_value(ctx.params.get(p.name), positional=True) for k, p in arguments.items()},
               "options": {k: recorded_value(ctx.params.get(p.name)) for k, p in options.items()}}
        token = INVOCATION.set(inv)
        try:
            return fn(*args, **kwargs)
        finally:
            INVOCATION.reset(token)

    return run
