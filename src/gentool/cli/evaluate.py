"""`gentool evaluate`: zero- and few-shot downstream tasks (lm-evaluation-harness task files) for AR and
masked/block-diffusion LMs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import ADVANCED, Device, Dtype, Force, Json, NoVerify, examples


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint, quantized checkpoint, Hugging Face Llama "
                                                    "directory or masked/block diffusion-checkpoint.")],
    tasks: Annotated[list[Path], typer.Argument(help="Task files: lm-eval task YAML (or TOML) over local JSON "
                                                     "lines or Parquet.")],
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", min=0, max=1000,
                                                       help="Few-shot examples per prompt (default: the task "
                                                            "file's num_fewshot, else 0).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N documents of each task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Continuations scored per forward pass.")] = 32,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Few-shot sampling seed (lm-eval's default 1234); "
                                                            "diffusion LMs: also the Monte-Carlo draws.")] = 1234,
    adapter: Annotated[Optional[Path], typer.Option(help="Apply a LoRA adapter (gentool or PEFT) without "
                                                         "merging.")] = None,
    mc_samples: Annotated[int, typer.Option("--mc-samples", min=1, max=4096,
                                            help="Diffusion LMs: Monte-Carlo draws of the bound per "
                                                 "continuation.")] = 32,
    max_gen_toks: Annotated[Optional[int], typer.Option(min=1, max=65536, help="generate_until: at most this many "
                                                                              "new tokens (default: the task's, "
                                                                              "else 256).",
                                                        rich_help_panel=ADVANCED)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write an evaluation artifact "
                                                                          "(results.json, per-example JSONL).")
                      ] = None,
    force: Force = False,
    device: Device = "auto",
    dtype: Dtype = None,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Zero- and few-shot downstream tasks, equal to lm-evaluation-harness.

    Task kinds: multiple_choice (acc, acc_norm), loglikelihood (acc of the greedy continuation, perplexity),
    loglikelihood_rolling (word/byte perplexity, bits per byte) and generate_until (exact_match), each metric with
    lm-eval's standard error. Prompts, few-shot draws and tokenization are lm-eval's, so the numbers are the same;
    multiple-choice contexts run once for all their choices. A diffusion LM scores a continuation by its
    Monte-Carlo NELBO bound given the context (--mc-samples), with its standard error in the example log, and
    generates greedily (low-confidence remasking, one token per step) for generate_until.
    """
    from gentool import console
    from gentool.artifacts.store import check_output
    from gentool.devices import resolve_device, resolve_dtype
    from gentool.lm.evaluate import evaluate as run, write_results

    if output is not None:
        check_output(output, force=force, sources=[str(checkpoint), *map(str, tasks)])
    dev = resolve_device(device)
    results, logs = run(checkpoint, list(tasks), num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                        seed=seed, adapter=adapter, device=dev, dtype=resolve_dtype(dtype, dev),
                        mc_samples=mc_samples, max_gen_toks=max_gen_toks, verify=not no_verify)
    if output is not None:
        write_results(output, results, logs, checkpoint, force=force)
    if json_:
        console.emit(results, as_json=True)
        return
    rows = {f"{name}/{k}": v for name, r in results["results"].items() for k, v in r.items()
            if k not in ("task", "output_type") and not k.endswith("_stderr")}
    console.emit(rows, as_json=False, title=f"evaluate {checkpoint}")


evaluate.epilog = examples("gentool evaluate runs/lm tasks/shakespeare_next_line.yaml --num-fewshot 3",
                           "gentool evaluate hf-llama/ hellaswag.yaml --limit 500 --device cuda --json",
                           "gentool evaluate runs/mdlm tasks/shakespeare_cloze.yaml --mc-samples 64 -o evals/mdlm")
