"""`gentool perplexity`: exact NLL, perplexity and bits per byte of an LM on shards, text or stdin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import ADVANCED, RUNTIME, Device, Dtype, Json, NoVerify, examples

DIFF = "Diffusion models"


def perplexity(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint, Hugging Face Llama directory or "
                                                    "diffusion-checkpoint.")],
    data: Annotated[Optional[list[str]], typer.Argument(help="A token-shards artifact, text files, or - for "
                                                             "stdin; for a diffusion-checkpoint a dataset "
                                                             "(default: its held-out split).")] = None,
    split: Annotated[str, typer.Option(help="Split of a token-shards artifact.")] = "val",
    window: Annotated[Optional[int], typer.Option(min=2, help="Context window (default: the length the model was "
                                                            "trained on, else its maximum context).")] = None,
    stride: Annotated[Optional[int], typer.Option(min=1, help="Tokens scored per window (default: half the window); "
                                                              "each token is scored once.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Score at most this many tokens (quick "
                                                                  "estimate).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 8,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option(help="Score shards made with another "
                                                                "tokenizer.", rich_help_panel=ADVANCED)] = False,
    adapter: Annotated[Optional[Path], typer.Option(help="Apply a LoRA adapter (gentool or PEFT) without "
                                                         "merging.")] = None,
    protocol: Annotated[str, typer.Option(help="gentool (each token once, the trained length's window), "
                                               "llama.cpp (512-token chunks, BOS first where the tokenizer adds "
                                               "one, second half scored) or hf-strided (the HF "
                                               "guide's windows, fixed).")] = "gentool",
    samples: Annotated[int, typer.Option(min=1, help="Diffusion LMs: Monte-Carlo samples of the bound per window.",
                                                rich_help_panel=DIFF)] = 1,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Diffusion LMs: discrete-time bound with T steps "
                                                             "(default: continuous time); image/vector diffusion: "
                                                             "timesteps sampled per example (default: all T).",
                                                        rich_help_panel=DIFF)] = None,
    max_examples: Annotated[Optional[int], typer.Option(min=1, help="Image/vector diffusion: score at most this many "
                                                                    "examples.", rich_help_panel=DIFF)] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the scorer (pays off for long "
                                                            "GPU runs; the first batch compiles).",
                                                 rich_help_panel=RUNTIME)] = False,
    reference: Annotated[Optional[Path], typer.Option(help="Compare with this (unquantized) model on the same "
                                                           "tokens: perplexity change, KL, top-1 agreement.")] = None,
    device: Device = "auto",
    dtype: Dtype = None,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Exact perplexity and bits per byte of a language model.

    Sliding-window scoring: every token is scored once with as much context as the window allows. Bits per byte
    use the UTF-8 bytes recorded in the shards' manifest (or of the raw text), so models with different
    tokenizers compare on one scale. For a masked- or block-diffusion LM it reports the NELBO, an upper bound on
    the same scale, with its standard error (--samples tightens it); block size 1 gives the exact NLL. For an image/vector diffusion checkpoint
    it reports the discrete-time negative ELBO in bits per dimension (8-bit data: discretised decoder).
    """
    from gentool import console
    from gentool.artifacts import probe
    from gentool.artifacts.probe import LM_FAMILIES
    from gentool.devices import resolve_device, resolve_dtype
    from gentool.errors import UsageProblem

    dev, found = resolve_device(device), probe(checkpoint)
    if found.is_denoiser:
        from gentool import diffusion

        if data and len(data) > 1:
            raise UsageProblem("give one dataset for a diffusion checkpoint")
        result = diffusion.elbo(checkpoint, data[0] if data else None, split=split, max_examples=max_examples,
                                t_samples=steps, device=dev, verify=not no_verify)
    elif reference is not None:  # the damage report of any change to the weights (quantization, merging)
        from gentool.evaluation.compare import compare_checkpoints

        result = compare_checkpoints(checkpoint, reference, data or [], split=split, window=window, stride=stride,
                                     max_tokens=max_tokens, batch_size=batch_size, device=dev,
                                     dtype=resolve_dtype(dtype, dev), verify=not no_verify, protocol=protocol)
    elif found.family in LM_FAMILIES:
        from gentool.lm.diffusion.serve import score_checkpoint

        result = score_checkpoint(checkpoint, data or [], split=split, window=window, max_tokens=max_tokens,
                                  batch_size=batch_size, device=dev, dtype=resolve_dtype(dtype, dev),
                                  allow_tokenizer_mismatch=allow_tokenizer_mismatch, verify=not no_verify,
                                  samples=samples, steps=steps)
    else:
        from gentool.lm.perplexity import score_checkpoint

        result = score_checkpoint(checkpoint, data or [], split=split, window=window, stride=stride,
                                  max_tokens=max_tokens, batch_size=batch_size, device=dev,
                                  dtype=resolve_dtype(dtype, dev), allow_tokenizer_mismatch=allow_tokenizer_mismatch,
                                  verify=not no_verify, adapter=adapter, protocol=protocol, compile=compile)
    console.emit(result, as_json=json_)


perplexity.epilog = examples("gentool perplexity runs/lm tokens", "gentool perplexity runs/lm notes.txt --json",
                             "cat text.txt | gentool perplexity hf-llama/ - --window 1024",
                             "gentool perplexity hf-llama/ tokens --device cuda --compile --batch-size 16",
                             "gentool perplexity runs/digits --max-examples 200 --json")
