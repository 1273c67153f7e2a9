"""`gentool sample`: generate from a checkpoint (AR decoding with a KV cache)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import Device, Dtype, Json, Seed, examples


def sample(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint or Hugging Face Llama directory.")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_file: Annotated[Optional[str], typer.Option("--prompt-file", help="Prompts, one per line (- for "
                                                                             "stdin).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per sample.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold.")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min-p times the top probability.")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise tokens already present (1 = off).")] = 1.0,
    num_samples: Annotated[int, typer.Option(help="Samples per prompt (decoded as one batch).")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this string appears (repeatable).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Apply a LoRA adapter without merging.")] = None,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="CUDA-graph the decode step "
                                                                                    "(default: on CUDA).")] = None,
    bench: Annotated[bool, typer.Option(help="Report tokens/s against the memory-bandwidth roofline.")] = False,
    json_: Json = False,
) -> None:
    """Sample text from a language model.

    A single prompt streams to stdout as it is generated; --json prints one JSON line per sample (prompt,
    completion, tokens, sum_logprob, tokens_per_s). Prompts come from --prompt, --prompt-file or stdin.
    """
    from gentool.lm.generate_cli import run_sample

    prompts = [prompt] if prompt is not None else None
    if prompts is None:
        src = sys.stdin if prompt_file in (None, "-") else open(prompt_file, encoding="utf-8")
        prompts = [line.rstrip("\n") for line in src if line.strip()] if (prompt_file or not sys.stdin.isatty()) \
            else [""]
    run_sample(checkpoint, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
               min_p=min_p, repetition_penalty=repetition_penalty, num_samples=num_samples, stop=stop or [],
               seed=seed, device=device, dtype=dtype, compile=compile_, bench=bench, as_json=json_,
               adapter=adapter)


sample.epilog = examples("gentool sample runs/lm --prompt 'ROMEO.' --max-new-tokens 100",
                         "gentool sample runs/lm -p 'To be' --temperature 0 --json",
                         "printf 'HAMLET.\\nOPHELIA.\\n' | gentool sample runs/lm --num-samples 2 --json")
