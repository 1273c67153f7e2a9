"""Exact perplexity and bits per byte of an AR LM, by sliding-window scoring.

Each token is scored exactly once, with as much left context as the window allows: each window of `window` tokens
scores only its last `stride` positions (the first window scores all of its positions but the first). Fixed relative to the Hugging Face perplexity guide's loop:
- it weights each window's *mean* loss by `trg_len` although only `trg_len - 1` targets are scored after the
  shift, which biases the average; we sum token NLLs and divide by the count of scored tokens;
- its last window can re-score tokens an earlier window scored; ours never does;
- the first token of the stream has no context and is not scored (with BOS prepended it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class Windows:
    start: int       # first token of the window
    end: int         # one past the last token
    score_from: int  # first position whose token is scored (absolute index)


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Windows]:
    """The first window scores its positions 1..window-1; each later one scores the next `stride` tokens with the
    window - stride tokens before them as context (at least one: stride is capped at window - 1)."""
    assert 0 < stride <= window and window >= 2
    stride = min(stride, window - 1)
    out, scored_to = [], 1
    while scored_to < n_tokens:
        end = min(window if scored_to == 1 else scored_to + stride, n_tokens)
        out.append(Windows(max(0, end - window), end, scored_to))
        scored_to = end
    return out


@dataclass
class PerplexityResult:
    nll: float              # mean negative log-likelihood, nats per scored token
    tokens: int             # tokens scored
    total_nll: float        # nats
    bytes: float | None     # UTF-8 bytes the scored tokens stand for
    window: int
    stride: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float | None:
        return self.total_nll / math.log(2) / self.bytes if self.bytes else None

    def as_dict(self) -> dict:
        return {"nll": self.nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "window": self.window, "stride": self.stride}


@torch.no_grad()
def token_nlls(model: torch.nn.Module, ids: torch.Tensor, *, window: int, stride: int, batch_size: int = 8,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NLL (nats, float64) of every scored token of the 1-D stream `ids`, in order."""
    plan = plan_windows(len(ids), window, stride)
    out: list[torch.Tensor] = []
    autocast = device.startswith("cuda") and dtype != torch.float32
    # full-length windows go in batches; a shorter final window alone
    groups: list[list[Windows]] = []
    for w in plan:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0].end - groups[-1][0].start) == (w.end - w.start):
            groups[-1].append(w)
        else:
            groups.append([w])
    for group in groups:
        x = torch.stack([ids[w.start:w.end] for w in group]).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=autocast):
            logits = model(x[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (B, T-1)
        for row, w in zip(nll, group):
            out.append(row[w.score_from - w.start - 1:].double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, *, window: int, stride: int | None = None,
               batch_size: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32,
               bytes_per_token: float | None = None, total_bytes: float | None = None) -> PerplexityResult:
    stride = stride or window
    nlls = token_nlls(model, ids, window=window, stride=stride, batch_size=batch_size, device=device, dtype=dtype)
    total = float(nlls.sum())
    n = len(nlls)
    n_bytes = total_bytes if total_bytes is not None else (bytes_per_token * n if bytes_per_token else None)
    return PerplexityResult(total / max(n, 1), n, total, n_bytes, window, stride)


def load_text_ids(paths: list[str], tokenizer) -> tuple[torch.Tensor, int]:
    """Token ids of text files or stdin ("-"), BOS first, and the UTF-8 byte count of the text."""
    import sys

    ids: list[int] = []
    n_bytes = 0
    for p in paths:
        data = sys.stdin.buffer.read() if p == "-" else Path(p).read_bytes()
        text = data.decode("utf-8", errors="replace")
        ids.extend(tokenizer.encode(text, bos=tokenizer.bos_id is not None))
        n_bytes += len(text.encode())
    return torch.tensor(ids, dtype=torch.long), n_bytes
