"""The `gentool` command. Each subcommand lives in its own module; none imports torch at import time."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from gentool import __version__, console
from gentool.cli._help import no_hyphen_breaks, plain_help
from gentool.cli._recipe import recorded
from gentool.errors import GentoolError, Terminated

# (module under gentool.cli, attribute): a function becomes a command, a Typer becomes a command group.
_COMMANDS: list[tuple[str, str]] = [
    ("tokenize", "app"), ("train_lm", "train_lm"), ("train_diffusion", "train_diffusion"), ("sample", "sample"),
    ("perplexity", "perplexity"), ("evaluate", "evaluate"), ("quantize", "quantize"), ("scale_fit", "scale_fit"),
    ("compare", "compare"), ("lora_merge", "lora_merge"), ("lora_extract", "lora_extract"),
    ("lora_extract", "lora_resize"), ("gguf_io", "import_gguf"), ("gguf_io", "export_gguf"),
]


# optional packages (pyproject.toml extras): top-level module -> extra
_EXTRAS = {"gguf": "gguf", "matplotlib": "plot", "tokenizers": "hf", "jinja2": "hf"}


class _Group(TyperGroup):
    """Turns errors a user can cause into one line and an exit code (tracebacks only with --debug)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain_help(self)
        no_hyphen_breaks()

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Usage errors (unknown option, bad value, missing argument) as one line, exit 2, keeping Click's "did you
        mean" suggestion; Typer would draw a boxed panel of five lines."""
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
        from typer.exceptions import Abort

        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except NoArgsIsHelpError as e:  # Typer has printed the help already
            if not standalone_mode:
                raise
            sys.exit(e.exit_code)
        except UsageError as e:
            if not standalone_mode:
                raise
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            console.err_console().print(f"error: {e.format_message()}{where}", markup=False, highlight=False)
            sys.exit(e.exit_code)
        except ClickException as e:
            if not standalone_mode:
                raise
            console.err_console().print(f"error: {e.format_message()}", markup=False, highlight=False)
            sys.exit(e.exit_code)
        except Abort:
            if not standalone_mode:
                raise
            console.err_console().print("error: aborted", markup=False)
            sys.exit(1)
        if standalone_mode:  # without it Click returns what it would have exited with
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except GentoolError as e:
            if console.is_debug():
                raise
            console.err_console().print(e.one_line(), markup=False, style="red", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            if console.is_debug():
                raise
            terminated = isinstance(e, Terminated)
            console.err_console().print("error: terminated" if terminated else "error: interrupted", markup=False)
            raise typer.Exit(143 if terminated else 130) from None
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (`| head`): quiet, as Click does
            raise typer.Exit(1) from None
        except Exception as e:
            if console.is_debug() or type(e).__module__.split(".")[0] in ("typer", "click"):
                raise
            top = (getattr(e, "name", None) or "").split(".")[0]
            if isinstance(e, ModuleNotFoundError) and top in _EXTRAS:
                console.err_console().print(f"error: this needs the optional package {top}; install it with pip "
                                            f"install 'gentool[{_EXTRAS[top]}]'", markup=False, highlight=False)
                raise typer.Exit(2) from None
            console.err_console().print(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for "
                                        f"the traceback, and please report it)", markup=False, highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="gentool", cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
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


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: temporary outputs are removed, state is saved
    app(prog_name="gentool")
