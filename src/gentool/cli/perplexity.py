"""`gentool perplexity`: exact NLL, perplexity and bits per byte of an LM on shards, text or stdin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import Device, Dtype, Json, NoVerify, examples


def perplexity(
    checkpoint: Annotated[Path, typer.Argument(help="lm-checkpoint or Hugging Face Llama directory.")],
    data: Annotated[Optional[list[str]], typer.Argument(help="A token-shards artifact, text files, or - for "
                                                             "stdin.")] = None,
    split: Annotated[str, typer.Option(help="Split of a token-shards artifact.")] = "val",
    window: Annotated[Optional[int], typer.Option(help="Context window (default: the model's).")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Tokens scored per window (default: half the window); "
                                                       "each token is scored once.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Score at most this many tokens (quick "
                                                           "estimate).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option(help="Score shards made with another "
                                                                "tokenizer.")] = False,
    adapter: Annotated[Optional[Path], typer.Option(help="Apply a LoRA adapter (gentool or PEFT) without "
                                                         "merging.")] = None,
    device: Device = "auto",
    dtype: Dtype = None,
    no_verify: NoVerify = False,
    json_: Json = False,
) -> None:
    """Exact perplexity and bits per byte of a language model.

    Sliding-window scoring: every token is scored once with as much context as the window allows. Bits per byte
    use the UTF-8 bytes recorded in the shards' manifest (or of the raw text), so models with different
    tokenizers compare on one scale.
    """
    from gentool import console
    from gentool.cli._options import resolve_device, resolve_dtype
    from gentool.lm.score import score_lm

    dev = resolve_device(device)
    result = score_lm(checkpoint, data or [], split=split, window=window, stride=stride, max_tokens=max_tokens,
                      batch_size=batch_size, device=dev, dtype=resolve_dtype(dtype, dev),
                      allow_tokenizer_mismatch=allow_tokenizer_mismatch, verify=not no_verify,
                      adapter=adapter)
    console.emit(result, as_json=json_)


perplexity.epilog = examples("gentool perplexity runs/lm tokens", "gentool perplexity runs/lm notes.txt --json",
                             "cat text.txt | gentool perplexity hf-llama/ - --window 1024")
