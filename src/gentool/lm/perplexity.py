"""`gentool perplexity` for autoregressive LMs: load the checkpoint (an adapter on top), pick the tokens, check the
tokenizer, score with sliding windows (gentool.evaluation.windows) under one of three protocols."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gentool.data.tokenizer import adds_bos, load_tokenizer
from gentool.devices import dtype_name
from gentool.errors import GentoolError, UsageProblem
from gentool.evaluation.tokens import bos_rule, load_eval_tokens
from gentool.evaluation.windows import PROTOCOLS, check_stride, perplexity, pick_window, trained_length
from gentool.models.checkpoint import load_lm


def check_window(window: int | None, context: int, protocol: str = "gentool") -> int:
    """--window, defaulting to the model's context (512 under the llama.cpp protocol); `score_checkpoint` also
    knows the trained length (`pick_window`)."""
    return pick_window(window, context=context, protocol=protocol)[0]


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
    context = lm.config.max_position_embeddings
    window, window_from = pick_window(window, context=context, trained=trained_length(lm.manifest, context),
                                      protocol=protocol)
    check_stride(window, stride)
    stride = stride or max(1, window // 2)
    tok = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else None
    ev = load_eval_tokens(data, tok, vocab_size=lm.config.vocab_size, split=split, max_tokens=max_tokens,
                          verify=verify, allow_tokenizer_mismatch=allow_tokenizer_mismatch, where=checkpoint)
    res = perplexity(lm.model, ev.ids, window=window, stride=stride, batch_size=batch_size, device=device,
                     dtype=dtype, bytes_per_token=None if ev.total_bytes else ev.bytes_per_token,
                     total_bytes=ev.total_bytes, protocol=protocol,
                     bos_id=tok.bos_id if adds_bos(tok) and protocol == "llama.cpp" else None, compile=compile)
    if not math.isfinite(res.nll):
        raise GentoolError(f"the NLL is not finite ({res.nll}) in {dtype_name(dtype)}: the model's activations "
                           "overflow", path=checkpoint, hint="score with --dtype bfloat16 or float32")
    res.bos, res.bos_rule = bos_rule(tok, protocol=protocol, from_shards=ev.from_shards)
    if ev.total_bytes and res.tokens < len(ev.ids) - 1:  # protocols that skip tokens: bytes in proportion
        res.bytes = ev.total_bytes * res.tokens / (len(ev.ids) - 1)
    return {**res.as_dict(), "window_from": window_from, "kind": "exact", **ev.source, "checkpoint": str(checkpoint),
            **({"adapter": str(adapter)} if adapter else {}), "dtype": dtype_name(dtype)}
