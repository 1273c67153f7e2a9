"""`gentool sample`: generate from a checkpoint (AR decoding with a KV cache, or a diffusion sampler)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import Device, Dtype, Force, Json, Seed, examples


def sample(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint, Hugging Face Llama directory or "
                                                    "diffusion-checkpoint.")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_file: Annotated[Optional[str], typer.Option("--prompt-file", help="Prompts, one per line (- for "
                                                                             "stdin).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per sample.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold.")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min-p times the top probability.")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise tokens already present (1 = off).")] = 1.0,
    num_samples: Annotated[Optional[int], typer.Option(help="Samples per prompt (decoded as one batch; default 1), "
                                                            "or images/points of a diffusion model (default 64).")] \
        = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this string appears (repeatable).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Apply a LoRA adapter without merging.")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer to use when the checkpoint has none (a "
                                                          "tokenizer artifact or file).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences decoded together (prompts x samples).")] = 16,
    chat: Annotated[bool, typer.Option(help="Wrap each prompt as a user message in the model's chat "
                                            "template.")] = False,
    cache: Annotated[bool, typer.Option(help="Masked-diffusion LMs: skip the network when nothing "
                                             "unmasked (same samples, fewer calls).")] = True,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="CUDA-graph the decode step "
                                                                                    "(default: on CUDA).")] = None,
    bench: Annotated[bool, typer.Option(help="Report tokens/s against the memory-bandwidth roofline.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Diffusion: write a samples artifact "
                                                                          "(safetensors + grid/scatter PNG).")] = None,
    force: Force = False,
    sampler: Annotated[Optional[str], typer.Option(help="Diffusion: ddpm, ddim, euler, heun, dpm++2m (default ddim); "
                                                        "flow: euler, heun, midpoint (default heun).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Diffusion: sampling steps (default 50; flow 20; masked "
                                                      "LM 64).")] = None,
    eta: Annotated[float, typer.Option(help="Diffusion: DDIM noise, 0 (deterministic) to 1 (= DDPM).")] = 0.0,
    class_: Annotated[Optional[str], typer.Option("--class", help="Diffusion: class to sample (default: all "
                                                                   "classes in turn).")] = None,
    guidance: Annotated[float, typer.Option(help="Diffusion: classifier-free guidance scale (1 = off).")] = 1.0,
    score: Annotated[Optional[str], typer.Option(help="Diffusion: score samples against DATA (or auto: the "
                                                      "checkpoint's held-out split): sliced Wasserstein, MMD.")] = None,
    json_: Json = False,
) -> None:
    """Sample text from an LM, or images/points from a diffusion model.

    A single prompt streams to stdout as it is generated; --json prints one JSON line per sample (prompt,
    completion, tokens, sum_logprob, tokens_per_s, stopped). Prompts come from --prompt, --prompt-file or stdin,
    one per line, decoded in batches. A prompt longer than the context window minus --max-new-tokens loses its
    beginning (with a warning). --temperature 0 is greedy; the same --seed gives the same samples.
    A masked-diffusion LM unmasks --max-new-tokens after the prompt in --steps steps (semi-autoregressive blocks
    beyond its window); its JSON lines carry the number of network calls (nfe).
    """
    family = checkpoint_family(checkpoint)
    if family == "diffusion":
        from gentool import console, diffusion
        from gentool.cli._options import resolve_device

        console.emit(diffusion.sample_checkpoint(
            checkpoint, output, sampler=sampler, steps=steps, eta=eta, num_samples=num_samples or 64, class_=class_,
            guidance=guidance, seed=seed, device=resolve_device(device), score=score, force=force), as_json=json_)
        return
    from gentool.lm.generate_cli import read_prompts, run_masked_sample, run_sample

    prompts = read_prompts(prompt, prompt_file, sys.stdin)
    if family == "masked-lm":
        from gentool.artifacts import read_artifact
        from gentool.cli._options import resolve_device

        run_masked_sample(checkpoint, read_artifact(checkpoint, "diffusion-checkpoint", verify=False), prompts,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          num_samples=num_samples or 1, seed=seed, device=resolve_device(device), steps=steps or 64,
                          cache=cache, as_json=json_)
        return
    run_sample(checkpoint, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
               min_p=min_p, repetition_penalty=repetition_penalty, num_samples=num_samples or 1, stop=stop or [],
               seed=seed, device=device, dtype=dtype, compile=compile_, bench=bench, as_json=json_,
               adapter=adapter, chat=chat, tokenizer=tokenizer, batch_size=batch_size)


def checkpoint_family(path: Path) -> str:
    """Which sampler serves PATH, from its manifest alone: "diffusion" (images, vectors), "masked-lm"
    (masked-diffusion LM) or "lm" (an lm-checkpoint, or a Hugging Face directory without a manifest)."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "lm"  # no manifest: a foreign checkpoint; load_lm explains what is missing
    if not isinstance(manifest, dict) or manifest.get("format") != "gentool.diffusion-checkpoint":
        return "lm"
    return "masked-lm" if (manifest.get("contents") or {}).get("family") == "masked-lm" else "diffusion"


sample.epilog = examples("gentool sample runs/lm --prompt 'ROMEO.' --max-new-tokens 100",
                         "gentool sample runs/lm -p 'To be' --temperature 0 --json",
                         "printf 'HAMLET.\\nOPHELIA.\\n' | gentool sample runs/lm --num-samples 2 --json",
                         "gentool sample runs/digits -o samples --sampler dpm++2m --steps 20 --score auto")
