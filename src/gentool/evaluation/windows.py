"""Sliding-window scoring of an AR LM: exact perplexity and bits per byte.

Each token is scored exactly once, with as much left context as the window allows: each window of `window` tokens
scores only its last `stride` positions (the first window scores all of its positions but the first).
Fixed relative to the Hugging Face perplexity guide's loop:
- it weights each window's *mean* loss by `trg_len` although only `trg_len - 1` targets are scored after the
  shift, which biases the average; we sum token NLLs and divide by the count of scored tokens;
- its last window can re-score tokens an earlier window scored; ours never does;
- the first token of the stream has no context and is not scored (with BOS prepended, where the tokenizer adds
  one, the text's first token is);
- transformers' loss upcasts the whole (B, T, V) logits to float32 at once; `window_nll` does it per row chunk,
  and only for positions some window scores.
Windows of equal length go through the model in batches; `--compile` compiles `window_nll` for a fixed shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gentool import console
from gentool.errors import UsageProblem


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


def plan_hf_strided(n_tokens: int, window: int, stride: int) -> list[Windows]:
    """The Hugging Face guide's windows (starts at multiples of `stride`), each token scored once: the guide's loop
    also scores a window's first position, which has no context inside the window; we start at begin + 1."""
    out, scored_to = [], 1
    for start in range(0, n_tokens, stride):
        end = min(start + window, n_tokens)
        if end > max(scored_to, start + 1):
            out.append(Windows(start, end, max(scored_to, start + 1)))
            scored_to = end
        if end == n_tokens:
            break
    return out


def plan_llamacpp(n_tokens: int, window: int) -> list[Windows]:
    """llama.cpp's `perplexity`: consecutive chunks of `window` tokens (a partial tail is dropped), BOS in the first
    position of each when the tokenizer adds BOS (`token_nlls`' bos_id; as it stands otherwise), scoring the second
    half of each chunk."""
    return [Windows(i * window, (i + 1) * window, i * window + window // 2 + 1) for i in range(n_tokens // window)]


PROTOCOLS = ("gentool", "hf-strided", "llama.cpp")


@dataclass
class PerplexityResult:
    nll: float              # mean negative log-likelihood, nats per scored token
    tokens: int             # tokens scored
    total_nll: float        # nats
    bytes: float | None     # UTF-8 bytes the scored tokens stand for
    window: int
    stride: int
    protocol: str = "gentool"
    bos: bool = False                  # a BOS token in front of the text / each llama.cpp chunk
    bos_rule: str = "as in the data"   # what the stream's first token is, and why

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.nll < 709 else math.inf  # exp overflows a float past 709.78

    @property
    def bits_per_byte(self) -> float | None:
        return self.total_nll / math.log(2) / self.bytes if self.bytes else None

    def as_dict(self) -> dict:
        return {"nll": self.nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "window": self.window, "stride": self.stride,
                "protocol": self.protocol, "bos": self.bos, "bos_rule": self.bos_rule}


def window_nll(model: torch.nn.Module, x_BT: torch.Tensor, *, chunk_rows: int = 4096, first: int = 0) -> torch.Tensor:
    """NLL (B, T-1-first) in float32 of x[:, first+1:] given the tokens before them. Only positions from `first`
    go through the output head (a protocol that scores the second half of each window skips the head for the first
    half, as llama.cpp does), and the head and log-softmax run over chunks of rows, so a (B·T, V) float32 logits
    tensor never exists (a 1.1B model at 8 x 2048 would need 2 GB)."""
    if not hasattr(model, "hidden_states"):  # any module returning logits
        logits = model(x_BT[:, :-1])[:, first:]
        return F.cross_entropy(logits.float().transpose(1, 2), x_BT[:, first + 1:], reduction="none")
    h_ND = model.hidden_states(x_BT[:, :-1])[:, first:].flatten(0, 1)
    y_N = x_BT[:, first + 1:].flatten()
    out = [F.cross_entropy(model.lm_head(h_ND[i:i + chunk_rows]).float(), y_N[i:i + chunk_rows], reduction="none")
           for i in range(0, len(y_N), chunk_rows)]
    return torch.cat(out).view(x_BT.shape[0], -1)


def nll_fn(model: torch.nn.Module, *, compile: bool = False):
    """`window_nll` bound to `model` (called as fn(x_BT, first)), optionally under torch.compile (fuses the norms,
    rotary, SwiGLU and the float32 log-softmax; fixed shapes, so `token_nlls` pads the last batch rather than
    recompile)."""
    def fn(x_BT, first=0):
        return window_nll(model, x_BT, first=first)
    return torch.compile(fn, dynamic=False) if compile else fn


def trained_length(manifest, context: int) -> int | None:
    """The sequence length a gentool checkpoint was trained on: train-lm's recipe `seq_len`, or a manifest's
    `context_length` below the model's maximum; None where nothing records one (Hugging Face and GGUF models, and
    artifacts that record only the maximum context)."""
    if manifest is None:
        return None
    seq_len, recorded = manifest.config.get("seq_len"), manifest.contents.get("context_length")
    if isinstance(seq_len, int) and 2 <= seq_len <= context:
        return seq_len
    if isinstance(recorded, int) and 2 <= recorded < context:
        return recorded
    return None


def pick_window(window: int | None, *, context: int, trained: int | None = None,
                protocol: str = "gentool") -> tuple[int, str]:
    """(--window, where it came from): as given; else 512 under the llama.cpp protocol (llama-perplexity's -c);
    else the length the model was trained on when its manifest records one; else the model's maximum context."""
    if window is not None:
        source = "--window"
    elif protocol == "llama.cpp":
        window, source = min(512, context), "llama-perplexity's 512-token chunks"
    elif trained is not None:
        window, source = trained, "trained sequence length (manifest)"
    else:
        window, source = context, "model's maximum context (no trained length recorded)"
    if window < 2:
        raise UsageProblem("--window must be at least 2")
    if window > context:
        raise UsageProblem(f"--window {window} exceeds the model's context ({context})",
                           hint=f"use --window {context} or less")
    return window, source


def check_stride(window: int, stride: int | None) -> None:
    """--stride must lie in 1..--window under every protocol (llama.cpp's ignores it, but refuses it the same)."""
    if window < 2:
        raise UsageProblem(f"--window {window} is too small", hint="use --window 2 or more")
    if stride is not None and not 1 <= stride <= window:
        raise UsageProblem(f"--stride {stride} is outside 1..{window} (the window)",
                           hint="a stride scores that many new tokens per window; use at most --window")


def plan_for(protocol: str, n_tokens: int, window: int, stride: int | None = None) -> list[Windows]:
    """The windows a protocol scores (stride default: half the window; hf-strided: the window)."""
    check_stride(window, stride)
    if protocol == "llama.cpp":
        return plan_llamacpp(n_tokens, window)
    if protocol == "hf-strided":
        return plan_hf_strided(n_tokens, window, stride or window)
    return plan_windows(n_tokens, window, stride or max(1, window // 2))


@torch.no_grad()
def token_nlls(model: torch.nn.Module, ids: torch.Tensor, *, window: int, stride: int, batch_size: int = 8,
               device: str = "cpu", dtype: torch.dtype = torch.float32, protocol: str = "gentool",
               bos_id: int | None = None, compile: bool = False, nll=None) -> torch.Tensor:
    """NLL (nats, float64) of every scored token of the 1-D stream `ids`, in order. `nll` (from `nll_fn`) lets a
    caller reuse one compiled function across calls."""
    plan = plan_for(protocol, len(ids), window, stride)
    if device == "cpu":  # float32 inference through oneDNN rather than MKL (models/decode.py)
        from gentool.models.decode import use_onednn_linears

        use_onednn_linears(model)
    nll = nll or nll_fn(model, compile=compile)
    out: list[torch.Tensor] = []
    autocast = device.startswith("cuda") and dtype != torch.float32
    # windows of one length go in batches (all but a text shorter than the window have the full length)
    groups: list[list[Windows]] = []
    for w in plan:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0].end - groups[-1][0].start) == (w.end - w.start):
            groups[-1].append(w)
        else:
            groups.append([w])
    ids = ids.to(device)
    with console.progress("scoring (tokens)", total=sum(w.end - w.score_from for w in plan)) as bar:
        for group in groups:
            x = torch.stack([ids[w.start:w.end] for w in group])
            if protocol == "llama.cpp" and bos_id is not None:  # llama.cpp overwrites each chunk's first token
                x[:, 0] = bos_id
            if compile and len(group) < batch_size:  # pad with copies: one compiled shape
                x = torch.cat([x, x[:1].expand(batch_size - len(group), -1)])
            first = min(w.score_from - w.start - 1 for w in group)  # positions before it are scored by no row
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=autocast):
                nll_BT = nll(x, first)
            for row, w in zip(nll_BT, group):
                out.append(row[w.score_from - w.start - 1 - first:].double())
            bar.update(advance=sum(w.end - w.score_from for w in group))
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, *, window: int, stride: int | None = None,
               batch_size: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32,
               bytes_per_token: float | None = None, total_bytes: float | None = None, protocol: str = "gentool",
               bos_id: int | None = None, compile: bool = False) -> PerplexityResult:
    stride = stride or window
    nlls = token_nlls(model, ids, window=window, stride=stride, batch_size=batch_size, device=device, dtype=dtype,
                      protocol=protocol, bos_id=bos_id, compile=compile)
    total = float(nlls.sum())
    n = len(nlls)
    if n == 0:  # llama.cpp's chunks: fewer tokens than one window score none (llama-perplexity refuses them too)
        raise UsageProblem(f"no token was scored: the data holds {len(ids)} tokens, fewer than one --window of "
                           f"{window} under the {protocol} protocol", hint="pass more data or a smaller --window")
    n_bytes = total_bytes if total_bytes is not None else (bytes_per_token * n if bytes_per_token else None)
    bos = protocol == "llama.cpp" and bos_id is not None
    return PerplexityResult(total / max(n, 1), n, total, n_bytes, window, stride if protocol != "llama.cpp" else
                            window, protocol, bos, "replaces each chunk's first token" if bos else "as in the data")
