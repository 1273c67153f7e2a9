"""A masked- or block-diffusion LM checkpoint at work: `gentool perplexity` (its NELBO on the AR scale) and
`gentool sample` (any sampler of samplers.py, with the AR sampler's prompt, stop, seed and JSON conventions)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.artifacts import read_artifact
from gentool.artifacts.probe import BLOCK_LM, MASKED_LM
from gentool.errors import UsageProblem
from gentool.lm.diffusion.block import block_nelbo_per_sequence
from gentool.lm.diffusion.masked import MaskSchedule, nelbo_per_sequence, score_nelbo
from gentool.lm.diffusion.samplers import generate_blocks, parse_sampler, sample_blocks


@dataclass
class DiffusionLM:
    model: torch.nn.Module
    tokenizer: Any
    family: str              # masked-lm | block-lm
    seq_len: int             # training window
    mask_id: int
    schedule: MaskSchedule
    max_context: int
    block_size: int | None   # block-lm only


def load_diffusion_lm(checkpoint: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      verify: bool = True) -> DiffusionLM:
    from gentool.data.tokenizer import load_tokenizer
    from gentool.models.checkpoint import load_lm

    manifest = read_artifact(checkpoint, "diffusion-checkpoint", verify=False)
    family = manifest.contents.get("family")
    if family not in (MASKED_LM, BLOCK_LM):
        raise UsageProblem(f"a {family} diffusion-checkpoint is not a language model", path=checkpoint)
    lm = load_lm(checkpoint, device=device, dtype=dtype, verify=verify, causal=False, kind="diffusion-checkpoint")
    shape = manifest.contents["data_shape"]
    tok = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else None
    return DiffusionLM(lm.model, tok, family, shape["seq_len"], shape["mask_id"],
                       MaskSchedule(manifest.contents.get("schedule", "loglinear")), lm.config.max_position_embeddings,
                       shape.get("block_size") if family == BLOCK_LM else None)


def score_checkpoint(checkpoint: Path, data: list[str], *, split: str = "val", window: int | None = None,
                     max_tokens: int | None = None, batch_size: int = 8, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, allow_tokenizer_mismatch: bool = False, verify: bool = True,
                     samples: int = 1, steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """`gentool perplexity` of a diffusion LM: its NELBO, an upper bound on the AR scale (nats per token, bits per
    byte), with its standard error, of the same tokens AR perplexity scores from the same data (every token of the
    stream but the first, which is context: an EOS before shards, BOS where the tokenizer adds one before text).
    A block-size-1 model's is its exact NLL."""
    from gentool.devices import dtype_name
    from gentool.evaluation.tokens import load_eval_tokens
    from gentool.lm.perplexity import check_window

    if not data:
        raise UsageProblem("no data to score", hint="pass a token-shards directory, text files, or - for stdin")
    m = load_diffusion_lm(checkpoint, device=device, dtype=dtype, verify=verify)
    window = min(check_window(window, m.max_context), m.seq_len)
    per_sequence, exact = nelbo_per_sequence, False
    if m.block_size:
        if window % m.block_size:
            raise UsageProblem(f"--window {window} is not a multiple of the block size {m.block_size}")
        exact = m.block_size == 1
        per_sequence = functools.partial(block_nelbo_per_sequence, block_size=m.block_size)
    ev = load_eval_tokens(data, m.tokenizer, vocab_size=m.mask_id + 1, split=split, max_tokens=max_tokens,
                          verify=verify, allow_tokenizer_mismatch=allow_tokenizer_mismatch, where=checkpoint)
    out = score_nelbo(m.model, ev.ids, seq_len=window, mask_id=m.mask_id, schedule=m.schedule.kind,
                      samples=1 if exact else samples, steps=None if exact else steps, batch_size=batch_size,
                      device=device, seed=seed, per_sequence=per_sequence)
    n_bytes = ev.total_bytes if ev.total_bytes else (ev.bytes_per_token * out["tokens"] if ev.bytes_per_token else None)
    bpb = out["nll"] * out["tokens"] / math.log(2) / n_bytes if n_bytes else None
    kind = "exact (block size 1: autoregressive)" if exact else f"upper bound (NELBO, {out['bound']})"
    return {"nll": out["nll"], "perplexity": math.exp(out["nll"]), "bits_per_byte": bpb,
            "nll_stderr": out["nll_stderr"], "tokens": out["tokens"], "samples": out["samples"], "kind": kind,
            **({"block_size": m.block_size} if m.block_size else {}), **ev.source, "checkpoint": str(checkpoint),
            "dtype": dtype_name(dtype)}


def _finish(tok, row: list[int], stop: list[str]) -> tuple[str, int, str]:
    """(completion text, tokens, why it ended): cut at the first end-of-text token or stop string, as the AR
    sampler does."""
    why = "length"
    if tok.eos_id is not None and tok.eos_id in row:
        row, why = row[:row.index(tok.eos_id)], "eos"
    text = tok.decode(row)
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    if hits:
        text, why = text[:min(hits)], "stop"
    return text, len(row), why


def sample_texts(checkpoint: Path, prompts: list[str], *, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, num_samples: int, seed: int, device: str,
                 steps: int | None = None, cache: bool = True, sampler: str | None = None,
                 stop: list[str] | None = None, kv_cache: bool = True) -> Iterator[dict[str, Any]]:
    """num_samples completions of each prompt: a masked LM fills max_new_tokens masks after the prompt
    (semi-autoregressive windows past its context), a block LM generates block by block with a KV cache. One
    record per sample with its network calls (nfe) and speed; generation ends early once every sample of the
    prompt has hit the end-of-text token or a stop string."""
    spec = parse_sampler(sampler)
    if max_new_tokens < 1 or num_samples < 1 or (steps is not None and steps < 1):
        raise UsageProblem("--max-new-tokens, --num-samples and --steps must be at least 1")
    if temperature < 0 or (top_k is not None and top_k < 1) or not (top_p is None or 0 < top_p <= 1):
        raise UsageProblem("bad sampling option", hint="--temperature >= 0, --top-k >= 1, 0 < --top-p <= 1")
    m = load_diffusion_lm(checkpoint, device=device)
    if m.tokenizer is None:
        raise UsageProblem("the checkpoint has no tokenizer", path=checkpoint)
    tok, stop = m.tokenizer, [s for s in (stop or []) if s]
    steps = steps or (m.block_size if m.block_size else 64)
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(sampler=spec, cache=cache, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)

    def done(new: torch.Tensor) -> bool:
        return all(_finish(tok, r, stop)[2] != "length" for r in new.tolist())

    for prompt in prompts or [""]:
        ids = [tok.eos_id] + tok.encode(prompt)  # documents follow an end-of-text token in the shards
        keep = m.seq_len // 2 if not m.block_size else m.seq_len - m.block_size
        if len(ids) > keep:
            console.warn(f"prompt of {len(ids)} tokens truncated from the left to {keep}")
            ids = ids[-keep:]
        start = torch.tensor([ids] * num_samples, device=device)
        t0 = time.perf_counter()
        if m.block_size:
            res = generate_blocks(m.model, start, max_new_tokens, m.mask_id, m.block_size, context=m.seq_len,
                                  steps=steps, kv_cache=kv_cache, should_stop=done, **kw)
        else:
            res = sample_blocks(m.model, start, max_new_tokens, m.mask_id, m.schedule, context=m.seq_len,
                                block=min(max_new_tokens, m.seq_len - len(ids)), steps=steps, should_stop=done, **kw)
        dt = time.perf_counter() - t0
        new = res.tokens[:, len(ids):]
        for row in new.tolist():
            text, n, why = _finish(tok, row, stop)
            yield {"prompt": prompt, "completion": text, "tokens": n, "stopped": why, "nfe": res.nfe,
                   "steps": steps, "sampler": str(spec), "cached": cache, "tokens_per_s": new.numel() / dt}
