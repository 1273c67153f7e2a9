"""Errors a user can cause. The CLI turns them into one line and an exit code; tracebacks only with --debug."""

from __future__ import annotations

from pathlib import Path


class GentoolError(ValueError):
    """Something went wrong while working (corrupt data, NaN loss, disk full): exit 1."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None,
                 exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"error: {where}{self.message}{hint}"

    def __str__(self) -> str:
        return self.one_line()[len("error: "):]


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers, `timeout` and container stops send) while a command runs: handled like Ctrl-C,
    exit 143."""


class UsageProblem(GentoolError):
    """Detectable before any work starts (bad option, missing input, wrong artifact kind, output exists): exit 2."""

    exit_code = 2
