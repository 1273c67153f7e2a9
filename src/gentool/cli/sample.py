"""`gentool sample`: generate from a checkpoint (AR decoding with a KV cache, or a diffusion sampler)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import RUNTIME, Device, Dtype, Force, Json, Seed, examples
from gentool.cli._recipe import Config

LM, DIFF = "Language models", "Diffusion models"


def sample(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint, Hugging Face Llama directory or "
                                                    "diffusion-checkpoint.")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_file: Annotated[Optional[str], typer.Option("--prompt-file", help="Prompts, one per line (- for "
                                                                             "stdin).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per sample.")] = 128,
    temperature: Annotated[float, typer.Option(min=0, help="0 means greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Keep the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0, max=1, help="Nucleus sampling threshold.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(min=1, help="Samples per prompt (one batch; default 1), or "
                                                             "images/points of a diffusion model (64).")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this string appears (repeatable).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Diffusion: sampling steps (default 50; flow 20; "
                                                             "masked LM 64; block LM: per block, the block size).")] \
        = None,
    min_p: Annotated[Optional[float], typer.Option(min=0, max=1, help="Drop tokens below min-p times the top "
                                                                      "probability.", rich_help_panel=LM)] = None,
    repetition_penalty: Annotated[float, typer.Option(min=0, help="Penalise tokens already present (1 = off).",
                                                             rich_help_panel=LM)] = 1.0,
    adapter: Annotated[Optional[Path], typer.Option(help="Apply a LoRA adapter without merging.",
                                                    rich_help_panel=LM)] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer to use when the checkpoint has none (a "
                                                           "tokenizer artifact or file).", rich_help_panel=LM)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences decoded together (prompts x samples).",
                                                   rich_help_panel=LM)] = 16,
    chat: Annotated[bool, typer.Option(help="Wrap each prompt as a user message in the model's chat template "
                                            "(SentencePiece: gentool's default).", rich_help_panel=LM)] = False,
    cache: Annotated[bool, typer.Option(help="Masked/block-diffusion LMs, ancestral sampler: skip the network when "
                                             "nothing unmasked (same samples, fewer calls).", rich_help_panel=LM)] = True,
    bench: Annotated[bool, typer.Option(help="Report tokens/s against the memory-bandwidth roofline.",
                                        rich_help_panel=LM)] = False,
    prompt_lookup: Annotated[int, typer.Option(min=0, help="Greedy, one sequence: draft up to N tokens from the "
                                                           "text so far and check them in one forward (same output; "
                                                           "0 = off).", rich_help_panel=LM)] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Diffusion: write a samples artifact "
                                                   "(safetensors + grid/scatter PNG).", rich_help_panel=DIFF)] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm, ddim, euler, heun, dpm++2m (default ddim); flow: "
                                                        "euler, heun, midpoint (default heun); masked/block LMs: "
                                                        "ancestral (default), confidence, margin, remdm[:ETA].",
                                                   rich_help_panel=DIFF)] = None,
    eta: Annotated[float, typer.Option(min=0, help="DDIM noise, 0 (deterministic) to 1 (= DDPM).",
                                              rich_help_panel=DIFF)] = 0.0,
    class_: Annotated[Optional[str], typer.Option("--class", help="Class to sample (default: all classes in turn).",
                                                  rich_help_panel=DIFF)] = None,
    guidance: Annotated[float, typer.Option(min=0, help="Classifier-free guidance scale (1 = off).",
                                                   rich_help_panel=DIFF)] = 1.0,
    score: Annotated[Optional[str], typer.Option(help="Score samples against DATA (or auto: the checkpoint's "
                                                      "held-out split): sliced Wasserstein, MMD.",
                                                 rich_help_panel=DIFF)] = None,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Compile the decode step: CUDA "
                        "graphs on CUDA (default there); on a CPU inductor instead of the one-call C++ step (minutes "
                        "to compile).", rich_help_panel=RUNTIME)] = None,
    force: Force = False,
    config: Config = None,
    json_: Json = False,
) -> None:
    """Sample text from an LM, or images/points from a diffusion model.

    A single prompt streams to stdout as it is generated; --json prints one JSON line per sample (prompt,
    completion, tokens, sum_logprob, tokens_per_s, stopped). Prompts come from --prompt, --prompt-file or stdin,
    one per line, decoded in batches. A prompt longer than the context window minus --max-new-tokens loses its
    beginning (with a warning). --temperature 0 is greedy; the same --seed gives the same samples.
    A masked-diffusion LM unmasks --max-new-tokens after the prompt in --steps steps (semi-autoregressive blocks
    beyond its window), a block-diffusion LM generates block by block with a KV cache, --steps per block; their
    JSON lines carry the number of network calls (nfe) and the --sampler used.
    """
    from gentool import console
    from gentool.artifacts import probe
    from gentool.artifacts.probe import LM_FAMILIES
    from gentool.cli._prompts import read_prompts
    from gentool.devices import resolve_device
    from gentool.errors import UsageProblem

    found, dev = probe(checkpoint), resolve_device(device)
    if found.is_denoiser:
        from gentool import diffusion

        console.emit(diffusion.sample_checkpoint(
            checkpoint, output, sampler=sampler, steps=steps, eta=eta, num_samples=num_samples or 64, class_=class_,
            guidance=guidance, seed=seed, device=dev, score=score, force=force), as_json=json_)
        return
    prompts = read_prompts(prompt, prompt_file, sys.stdin)
    if found.family in LM_FAMILIES:
        from gentool.lm.diffusion.serve import sample_texts

        for r in sample_texts(checkpoint, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, num_samples=num_samples or 1, seed=seed, device=dev,
                              steps=steps, cache=cache, sampler=sampler, stop=stop):
            console.emit(r, as_json=True) if json_ else sys.stdout.write(r["prompt"] + r["completion"] + "\n")
        sys.stdout.flush()
        return
    if sampler is not None:
        raise UsageProblem(f"--sampler {sampler} is for diffusion models", path=checkpoint,
                           hint="an autoregressive LM decodes token by token: drop --sampler")
    from gentool.lm.generate import check_params, encode_prompts, generate, open_generator
    from gentool.lm.sample import SamplingParams, benchmark

    n = num_samples or 1
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or [])
    check_params(params, num_samples=n, batch_size=batch_size)
    if prompt_lookup < 0:
        raise UsageProblem("--prompt-lookup must be 0 (off) or more")
    gen = open_generator(checkpoint, device=dev, dtype=dtype, compile=compile_, adapter=adapter, tokenizer=tokenizer)
    gen.prompt_lookup = prompt_lookup
    rows, samples = encode_prompts(gen, prompts, max_new_tokens=max_new_tokens, num_samples=n, chat=chat)
    if len(rows) == 1 and not json_:  # one sample: stream it
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        for _ in generate(gen, rows, samples, params, on_text=lambda p: (sys.stdout.write(p), sys.stdout.flush())):
            sys.stdout.write("\n")
    else:
        for c in generate(gen, rows, samples, params, batch_size=batch_size):
            if json_:
                console.emit({k: v for k, v in asdict(c).items() if k not in ("token_ids", "logprobs")}, as_json=True)
            else:
                sys.stdout.write(c.prompt + c.completion + "\n")
    sys.stdout.flush()
    if bench:  # batch-1 decoding reads every weight once per token: the copy bandwidth bounds tokens/s
        console.emit(benchmark(gen, params, rows[0][1]), as_json=json_, title="decode benchmark (batch 1)")


sample.epilog = examples("gentool sample runs/lm --prompt 'ROMEO.' --max-new-tokens 100",
                         "gentool sample runs/lm -p 'To be' --temperature 0 --json",
                         "gentool sample runs/lm -p 'To be' --temperature 0 --prompt-lookup 8 --compile",
                         "printf 'HAMLET.\\nOPHELIA.\\n' | gentool sample runs/lm --num-samples 2 --json",
                         "gentool sample runs/bd3 -p 'ROMEO.' --sampler confidence --steps 2 --json",
                         "gentool sample runs/digits -o samples --sampler dpm++2m --steps 20 --score auto")
