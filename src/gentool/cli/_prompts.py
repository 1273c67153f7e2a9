"""Where `gentool sample` takes its prompts from."""

from __future__ import annotations

from pathlib import Path

from gentool.errors import UsageProblem


def read_prompts(prompt: str | None, prompt_file: str | None, stdin) -> list[str]:
    """--prompt TEXT (may be empty: unconditional), else one prompt per non-blank line of --prompt-file (- is
    stdin), else of stdin when it is not a terminal, else one unconditional sample."""
    if prompt is not None and prompt_file is not None:
        raise UsageProblem("--prompt and --prompt-file both given", hint="pass one of them")
    if prompt is not None:
        return [prompt]
    if prompt_file is None and stdin.isatty():
        return [""]
    name = "stdin" if prompt_file in (None, "-") else prompt_file
    try:
        if name == "stdin":  # bytes, then strict UTF-8: a text-mode stdin smuggles undecodable bytes as surrogates
            data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
        else:
            data = Path(name).read_bytes()
        lines = data.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UsageProblem("no such prompt file", path=name, hint="pass an existing file, or - for stdin") from None
    except IsADirectoryError:
        raise UsageProblem("is a directory, not a prompt file", path=name) from None
    except UnicodeError:
        raise UsageProblem(f"the prompts ({name}) are not UTF-8 text", hint="pass text, one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageProblem("empty input: no prompts (one per line expected)", path=name,
                           hint="pass --prompt TEXT; --prompt '' samples unconditionally")
    return prompts
