"""The `gentool` command. Each subcommand lives in its own module; none imports torch at import time."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from gentool import __version__, console
from gentool.cli._recipe import recorded
from gentool.errors import GentoolError

# (module under gentool.cli, attribute): a function becomes a command, a Typer becomes a command group.
_COMMANDS: list[tuple[str, str]] = [
    ("tokenize", "app"),
    ("train_lm", "train_lm"),
    ("train_diffusion", "train_diffusion"),
    ("sample", "sample"),
    ("perplexity", "perplexity"),
    ("quantize", "quantize"),
    ("scale_fit", "scale_fit"),
    ("compare", "compare"),
    ("lora_merge", "lora_merge"),
    ("gguf_io", "import_gguf"),
    ("gguf_io", "export_gguf"),
]


class _Group(TyperGroup):
    """Turns errors a user can cause into one line and an exit code (tracebacks only with --debug)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except GentoolError as e:
            if console.is_debug():
                raise
            console.err_console().print(e.one_line(), markup=False, style="red", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            if console.is_debug():
                raise
            console.err_console().print("error: interrupted", markup=False)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (`| head`): quiet, as Click does
            raise typer.Exit(1) from None
        except Exception as e:
            if console.is_debug() or type(e).__module__.split(".")[0] in ("typer", "click"):
                raise
            console.err_console().print(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for "
                                        f"the traceback, and please report it)", markup=False, highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="gentool", cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Single-purpose tools for generative-model experiments. Results go to stdout, progress and logs to "
         "stderr; every tool reads and writes artifact directories (safetensors + manifest.json).",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gentool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Silence progress and logs (errors still show).")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log lines (repeatable).")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    console.configure(quiet=quiet, verbose=verbose, debug=debug)


for _module, _attr in _COMMANDS:
    _obj = getattr(import_module(f"gentool.cli.{_module}"), _attr)
    if isinstance(_obj, typer.Typer):
        for _info in _obj.registered_commands:
            _info.callback = recorded(_info.callback)
        app.add_typer(_obj)
    else:
        app.command(epilog=getattr(_obj, "epilog", None))(recorded(_obj))


def main() -> None:
    app(prog_name="gentool")
