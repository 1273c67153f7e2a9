"""Continuation scoring for downstream tasks: log p(continuation | context) of an AR LM, whether the continuation
is the greedy one, and its per-token log-probabilities, the way lm-evaluation-harness computes them.

Tokenization is lm-eval's (0.4.x `HFLM._encode_pair`, `tok_encode`): trailing whitespace of the context moves to
the continuation, `encode(context + continuation)` is split at the length of `encode(context)`, both encoded with
the tokenizer's default special tokens (a Hugging Face tokenizer's `add_special_tokens=True`: BOS for Llama-style
tokenizers, none for GPT-2-style ones; a gentool SentencePiece tokenizer adds BOS, as transformers' LlamaTokenizer
does). An empty context becomes the prefix token (BOS, or EOS when there is none) before the continuation encoded
without special tokens. Sequences longer than the model's
context are cut from the left, as lm-eval's `(context + continuation)[-(max_length + 1):][:-1]`.

Speed: requests that share a context (the choices of a multiple-choice question) run the context once. Contexts
are left-padded so they all end at one position, run through the model filling its static KV cache
(`Transformer.setup_cache`), the cache rows are repeated once per choice, and the choices run as one batch on top
(right-padded; causal attention never lets a real token see a pad). Batches are sorted by length. The scores use
the shared core `evaluation.logprobs` (float32 whatever the model's dtype).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gentool import console
from gentool.evaluation.logprobs import masked_sums, token_logprobs


@dataclass
class Score:
    logprob: float                 # summed log-likelihood of the continuation (nats)
    greedy: bool                   # every continuation token is the argmax given what precedes it
    token_logprobs: list[float] = field(default_factory=list)


def prefix_token(tokenizer) -> int:
    """lm-eval's `prefix_token_id`: BOS, or EOS for tokenizers without one."""
    tid = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if tid is None:
        from gentool.errors import UsageProblem

        raise UsageProblem("the tokenizer has neither BOS nor EOS to stand for an empty context")
    return tid


def encode_default(tokenizer, text: str) -> list[int]:
    """`text` with the special tokens the tokenizer adds by default (lm-eval's `tok_encode` without arguments)."""
    if hasattr(tokenizer, "encode_default"):
        return tokenizer.encode_default(text)
    return tokenizer.encode(text, bos=getattr(tokenizer, "add_bos", False))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM encodes a loglikelihood request."""
    if context == "":
        cont = tokenizer.encode(continuation)
        prefix = prefix_token(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_default(tokenizer, context + continuation)
    ctx = encode_default(tokenizer, context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(context_len=1)` followed by `make_disjoint_window`: disjoint
    (context, continuation) pairs that score every token of `tokens` once, the first one after `prefix`."""
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[:first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        windows.append((tokens[max(0, end - max_len - 1):end - 1], tokens[end - n:end]))
        predicted += n
    for a, b in windows:
        out.append((a[:len(a) - (len(b) - 1)], b))
    return out


def _fit(ctx: Sequence[int], cont: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut the context from the left so context + continuation - 1 fits `max_len` positions (lm-eval's cut)."""
    if len(cont) > max_len:
        from gentool.errors import UsageProblem

        raise UsageProblem(f"a continuation of {len(cont)} tokens exceeds the model's context ({max_len})",
                           hint="shorten the task's targets or choices")
    keep = max_len + 1 - len(cont)
    return list(ctx[-keep:]), list(cont)


def _batches(groups: list[tuple[tuple[int, ...], list[int]]], conts: list[list[int]], batch_size: int
             ) -> Iterator[list[tuple[tuple[int, ...], list[int]]]]:
    """Groups (context, request indices) in batches of at most `batch_size` continuation rows (a group larger
    than that is a batch of its own), longest first so one batch holds similar lengths."""
    order = sorted(groups, key=lambda g: -(len(g[0]) + max(len(conts[i]) for i in g[1])))
    batch: list = []
    rows = 0
    for g in order:
        if batch and rows + len(g[1]) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(g)
        rows += len(g[1])
    if batch:
        yield batch


@torch.no_grad()
def _score_batch(model, batch, conts: list[list[int]], device, pad_id: int, chunk: int) -> list[Score]:
    ctxs = [list(c) for c, _ in batch]
    prefix_len = max(len(c) - 1 for c in ctxs)  # contexts left-padded to end at position prefix_len
    rows = [(gi, i) for gi, (_, idx) in enumerate(batch) for i in idx]
    inputs = [[ctxs[gi][-1]] + conts[i][:-1] for gi, i in rows]
    t = max(len(x) for x in inputs)
    s = prefix_len + t
    dtype = model.model.norm.weight.dtype
    model.setup_cache(len(batch), s, dtype=dtype, device=device)
    try:
        valid = torch.zeros(len(batch), s, dtype=torch.bool, device=device)
        for gi, c in enumerate(ctxs):
            valid[gi, prefix_len - (len(c) - 1):] = True
        if prefix_len:
            x = torch.full((len(batch), prefix_len), pad_id, dtype=torch.long)
            for gi, c in enumerate(ctxs):
                if len(c) > 1:
                    x[gi, prefix_len - (len(c) - 1):] = torch.tensor(c[:-1])
            model.hidden_states(x.to(device), input_pos=torch.arange(prefix_len, device=device),
                                attention_mask=valid)
        pick = torch.tensor([gi for gi, _ in rows], device=device)
        for layer in model.model.layers:  # one cache row per continuation: its context's keys and values
            cache = layer.self_attn.kv_cache
            cache.k, cache.v = cache.k.index_select(0, pick), cache.v.index_select(0, pick)
        x = torch.full((len(rows), t), pad_id, dtype=torch.long)
        y = torch.full((len(rows), t), -1, dtype=torch.long)
        for r, ((gi, i), inp) in enumerate(zip(rows, inputs)):
            x[r, :len(inp)] = torch.tensor(inp)
            y[r, :len(conts[i])] = torch.tensor(conts[i])
        x, y = x.to(device), y.to(device)
        h = model.hidden_states(x, input_pos=torch.arange(prefix_len, s, device=device),
                                attention_mask=valid.index_select(0, pick))
    finally:
        model.reset_cache()
    logp, greedy = [], []
    for a in range(0, len(rows), max(1, chunk // t)):  # the head over a few rows at a time
        logits = model.lm_head(h[a:a + max(1, chunk // t)])
        yy = y[a:a + max(1, chunk // t)]
        logp.append(token_logprobs(logits, yy))
        greedy.append(((logits.argmax(-1) == yy) | (yy < 0)).all(-1))
    lp_RT, ok_R = torch.cat(logp), torch.cat(greedy)
    sums, _ = masked_sums(lp_RT.double(), y >= 0)
    return [Score(float(sums[r]), bool(ok_R[r]), lp_RT[r, :len(conts[i])].tolist()) for r, (_, i) in enumerate(rows)]


def score_continuations(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                        device: str = "cpu", dtype: torch.dtype = torch.float32, max_len: int | None = None,
                        pad_id: int = 0, chunk_rows: int = 4096) -> list[Score]:
    """Score (context ids, continuation ids) requests with an AR Transformer; results in request order.
    Requests with the same (cut) context share one pass over it. `batch_size`: continuation rows per pass."""
    max_len = max_len or model.config.max_position_embeddings
    fitted = [_fit(c, k, max_len) for c, k in requests]
    for c, k in fitted:
        if not c or not k:
            from gentool.errors import UsageProblem

            raise UsageProblem("a request has an empty context or continuation after tokenization",
                               hint="check the task's templates: every target and choice must be non-empty")
    conts = [k for _, k in fitted]
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (c, _) in enumerate(fitted):
        by_ctx.setdefault(tuple(c), []).append(i)
    out: list[Score | None] = [None] * len(requests)
    autocast = device.startswith("cuda") and dtype != torch.float32
    with console.progress("scoring (requests)", total=len(requests)) as bar:
        for batch in _batches(list(by_ctx.items()), conts, batch_size):
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=autocast):
                scores = _score_batch(model, batch, conts, device, pad_id, chunk_rows)
            for s, i in zip(scores, (i for _, idx in batch for i in idx)):
                out[i] = s
            bar.update(advance=len(scores))
    return out  # type: ignore[return-value]
