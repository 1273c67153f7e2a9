"""stderr for people (progress, logs), stdout for results. Rich on a TTY, plain lines otherwise."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import PurePath
from typing import Any, Iterator

from rich.console import Console

_state = {"quiet": False, "verbose": 0, "debug": False}
_err: Console | None = None


def configure(*, quiet: bool = False, verbose: int = 0, debug: bool = False) -> None:
    global _err
    _state.update(quiet=quiet, verbose=verbose, debug=debug)
    _err = None


def is_debug() -> bool:
    return bool(_state["debug"])


def err_console() -> Console:
    """The stderr console (created lazily so tests that swap sys.stderr see their stream). Not quiet under --quiet:
    log lines, warnings and progress check the setting themselves, and errors always show."""
    global _err
    if _err is None or _err.file is not sys.stderr:
        _err = Console(stderr=True, highlight=False, soft_wrap=True)
    return _err


def log(message: str) -> None:
    if not _state["quiet"]:
        err_console().print(message, markup=False)


def debug(message: str) -> None:
    if _state["verbose"] > 0 or _state["debug"]:
        log(message)


def warn(message: str) -> None:
    """A warning on stderr; --quiet silences it like every other log line."""
    if not _state["quiet"]:
        err_console().print(f"warning: {message}", markup=False, style="yellow")


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """A progress handle: rich bar on a TTY, a plain line every `every` seconds otherwise."""

    def __init__(self, description: str, total: float | None, every: float):
        self.description, self.total, self.every = description, total, every
        self.completed = 0.0
        self.fields: dict[str, Any] = {}
        self._last = self._start = time.monotonic()
        self._bar = None
        self._task = None

    def update(self, advance: float = 0, completed: float | None = None, **fields: Any) -> None:
        self.completed = completed if completed is not None else self.completed + advance
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, info=self._info())
        elif not _state["quiet"] and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            log(self.line())

    def _info(self) -> str:
        parts = []
        for k, v in self.fields.items():
            if isinstance(v, float):
                v = f"{v:.4g}" if math.isfinite(v) else str(v)
            parts.append(f"{k} {v}")
        return "  ".join(parts)

    def line(self) -> str:
        done = f"{self.completed:g}" + (f"/{self.total:g}" if self.total else "")
        eta = ""
        if self.total and self.completed and "eta" not in self.fields:
            left = (time.monotonic() - self._start) * (self.total - self.completed) / self.completed
            eta = f"  eta {format_eta(left)}"
        return f"{self.description}: {done}{eta}  {self._info()}".rstrip()


@contextmanager
def progress(description: str, total: float | None = None, *, every: float = 10.0) -> Iterator[_Progress]:
    """Progress on stderr. Never diverts stdout (rich's default redirect_stdout=True would)."""
    handle = _Progress(description, total, every)
    console = err_console()
    if _state["quiet"] or not console.is_terminal:
        yield handle
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:g}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                   console=console, transient=True, redirect_stdout=False, redirect_stderr=False)
    with bar:
        handle._bar, handle._task = bar, bar.add_task(description, total=total, info="")
        yield handle


def jsonable(obj: Any) -> Any:
    """What JSON can hold: NaN/Inf become null, tuples lists, paths POSIX strings, numpy/torch scalars numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), ensure_ascii=False, allow_nan=False)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"   # a value that does not exist (an undefined statistic), never Python's "None"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return dumps(v)
    return str(v)


def emit(result: dict[str, Any], *, as_json: bool, title: str | None = None) -> None:
    """Print a result to stdout: one JSON object with as_json, else an aligned key/value table."""
    if as_json:
        sys.stdout.write(dumps(result) + "\n")
    else:
        if title:
            sys.stdout.write(title + "\n")
        width = max((len(str(k)) for k in result), default=0)
        for k, v in result.items():
            sys.stdout.write(f"{str(k):<{width}}  {_fmt(v)}\n")
    sys.stdout.flush()
