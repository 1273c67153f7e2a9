"""`gentool perplexity` for autoregressive LMs: load the checkpoint (an adapter on top), pick the tokens, check the
tokenizer, score with sliding windows (gentool.evaluation.windows) under one of three protocols."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gentool.data.tokenizer import load_tokenizer
from gentool.devices import dtype_name
from gentool.errors import GentoolError, UsageProblem
from gentool.evaluation.tokens import load_eval_tokens
from gentool.evaluation.windows import PROTOCOLS, perplexity
from gentool.models.checkpoint import load_lm


def check_window(window: int | None, context: int, protocol: str = "gentool") -> int:
    """--window, defaulting to the model's context (512 under the llama.cpp protocol)."""
    window = window or (512 if protocol == "llama.cpp" else context)
    if window < 2:
        raise UsageProblem("--window must be at least 2")
    if window > context:
        raise UsageProblem(f"--window {window} exceeds the model's context ({context})")
    return window


def score_checkpoint(checkpoint: Path, data: list[str], *, split: str = "val", window: int | None = None,
                     stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                     device: str = "cpu", dtype: torch.dtype = torch.float32, allow_tokenizer_mismatch: bool = False,
                     verify: bool = True, adapter: Path | None = None, protocol: str = "gentool",
                     compile: bool = False) -> dict[str, Any]:
    """Exact NLL, perplexity and bits per byte of an lm-checkpoint, quantized checkpoint or HF Llama directory."""
    if protocol not in PROTOCOLS:
        raise UsageProblem(f"unknown --protocol {protocol!r}", hint="use " + ", ".join(PROTOCOLS))
    if not data:
        raise UsageProblem("no data to score", hint="pass a token-shards directory, text files, or - for stdin")
    lm = load_lm(checkpoint, device=device, dtype=dtype, verify=verify)
    if adapter is not None:
        from gentool.adapters import attach_adapter

        attach_adapter(lm.model, checkpoint, adapter, verify=verify)
        lm.model.to(device=device, dtype=dtype).eval()
    window = check_window(window, lm.config.max_position_embeddings, protocol)
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise UsageProblem(f"--stride {stride} is outside 1..{window} (the window)",
                           hint="a stride scores that many new tokens per window; use at most --window")
    tok = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else None
    ev = load_eval_tokens(data, tok, vocab_size=lm.config.vocab_size, split=split, max_tokens=max_tokens,
                          verify=verify, allow_tokenizer_mismatch=allow_tokenizer_mismatch, where=checkpoint)
    res = perplexity(lm.model, ev.ids, window=window, stride=stride, batch_size=batch_size, device=device,
                     dtype=dtype, bytes_per_token=None if ev.total_bytes else ev.bytes_per_token,
                     total_bytes=ev.total_bytes, protocol=protocol,
                     bos_id=tok.bos_id if tok is not None and protocol == "llama.cpp" else None, compile=compile)
    if not math.isfinite(res.nll):
        raise GentoolError(f"the NLL is not finite ({res.nll}) in {dtype_name(dtype)}: the model's activations "
                           "overflow", path=checkpoint, hint="score with --dtype bfloat16 or float32")
    if ev.from_shards and protocol != "llama.cpp":
        res.bos = "EOS prepended (documents are EOS-separated)"
    if protocol != "llama.cpp" and not ev.from_shards and tok is not None and tok.bos_id is not None:
        res.bos = "prepended to the text"
    if ev.total_bytes and res.tokens < len(ev.ids) - 1:  # protocols that skip tokens: bytes in proportion
        res.bytes = ev.total_bytes * res.tokens / (len(ev.ids) - 1)
    return {**res.as_dict(), "kind": "exact", **ev.source, "checkpoint": str(checkpoint),
            **({"adapter": str(adapter)} if adapter else {}), "dtype": dtype_name(dtype)}
