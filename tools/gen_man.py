#!/usr/bin/env python3
"""Generate man/*.1 from the Typer CLI (click-man cannot see Typer >= 0.26's options, so roff is written here).

    python tools/gen_man.py           # write man/
    python tools/gen_man.py --check   # exit 1 if man/ is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gentool import __version__
from gentool.cli import app

MAN = Path(__file__).resolve().parent.parent / "man"
EXIT_STATUS = [("0", "success, including an output that is already up to date"),
               ("1", "failure while working: corrupt or invalid data, NaN loss, disk full, hash mismatch"),
               ("2", "usage: bad option, missing input, wrong artifact kind, output exists without --force"),
               ("130", "interrupted (state saved where possible)")]


def esc(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _param_line(p) -> tuple[str, str]:
    if getattr(p, "param_type_name", "") == "argument":
        name = p.name.upper() + ("..." if getattr(p, "nargs", 1) == -1 else "")
        return name, getattr(p, "help", None) or ""
    names = ", ".join(p.opts + list(getattr(p, "secondary_opts", [])))
    if not getattr(p, "is_flag", False) and not getattr(p, "count", False):
        names += " " + (p.metavar or p.type.name.upper() if hasattr(p, "type") else "VALUE")
    help_ = getattr(p, "help", None) or ""
    default = getattr(p, "default", None)
    if getattr(p, "show_default", True) is not False and default not in (None, False, (), []) \
            and not getattr(p, "is_flag", False) and not callable(default):
        help_ += f" [default: {default}]"
    return names, help_


def render(cmd, path: list[str]) -> str:
    full = " ".join(path)
    title = "-".join(path).upper()
    help_text = (cmd.help or "").strip()
    summary = help_text.splitlines()[0].split(". ")[0].rstrip(".") if help_text else ""
    lines = [f'.TH {title} 1 "" "gentool {__version__}" "gentool manual"', ".SH NAME",
             f"{esc('-'.join(path))} \\- {esc(summary)}", ".SH SYNOPSIS", f".B {esc(full)}"]
    params = [p for p in cmd.params if getattr(p, "name", None) != "help" and not getattr(p, "hidden", False)]
    args = [p for p in params if getattr(p, "param_type_name", "") == "argument"]
    lines.append(esc(" ".join(["[OPTIONS]"] + [_param_line(a)[0] for a in args]
                              + (["COMMAND [ARGS]..."] if hasattr(cmd, "commands") else []))))
    if help_text:
        lines += [".SH DESCRIPTION", esc(help_text.replace("\b\n", ""))]
    if params:
        lines.append(".SH OPTIONS")
        for p in params:
            names, h = _param_line(p)
            lines += [".TP", f".B {esc(names)}", esc(h) if h else ""]
    if hasattr(cmd, "commands"):
        lines.append(".SH COMMANDS")
        for name, sub in sorted(cmd.commands.items()):
            lines += [".TP", f".B {esc(name)}", esc((sub.help or "").strip().splitlines()[0] if sub.help else ""),
                      f"See \\fB{esc('-'.join(path + [name]))}\\fR(1)."]
    if cmd.epilog:
        lines += [".SH EXAMPLES", ".nf", esc(cmd.epilog.replace("\b\n", "").replace("Examples:\n", "")), ".fi"]
    if len(path) == 1:
        lines.append(".SH EXIT STATUS")
        for code, text in EXIT_STATUS:
            lines += [".TP", f".B {code}", esc(text)]
        lines += [".SH ENVIRONMENT", "NO_COLOR disables colour on stderr; TYPER_STANDARD_TRACEBACK=1 or --debug shows "
                  "tracebacks."]
    return "\n".join(line for line in lines if line is not None) + "\n"


def pages() -> dict[str, str]:
    root = typer.main.get_command(app)
    out: dict[str, str] = {}

    def walk(cmd, path):
        out["-".join(path) + ".1"] = render(cmd, path)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, path + [name])

    walk(root, ["gentool"])
    return out


def main(argv: list[str]) -> int:
    want = pages()
    if "--check" in argv:
        have = {p.name: p.read_text() for p in MAN.glob("*.1")} if MAN.is_dir() else {}
        if have != want:
            stale = sorted(set(have) ^ set(want) | {k for k in want if have.get(k) != want[k]})
            print("man/ is stale: " + ", ".join(stale) + "; run `make man`", file=sys.stderr)
            return 1
        return 0
    MAN.mkdir(exist_ok=True)
    for old in MAN.glob("*.1"):
        if old.name not in want:
            old.unlink()
    for name, text in want.items():
        (MAN / name).write_text(text)
    print(f"wrote {len(want)} man pages to {MAN}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
