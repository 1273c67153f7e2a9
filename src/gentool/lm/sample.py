"""Autoregressive sampling with a static KV cache: greedy, temperature, top-k, top-p, min-p, repetition penalty.

On CUDA the one-token decode step runs under torch.compile(mode="reduce-overhead"), which captures it as a CUDA
graph over the static cache (gpt-fast's recipe); on CPU the same step runs eagerly and incrementally.
A prompt longer than the context window minus --max-new-tokens is truncated from the left, with a warning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gentool import console


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> filtered, temperature-scaled logits (-inf where excluded)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:  # CTRL / transformers convention
        picked = logits.gather(-1, seen)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits = logits.scatter(-1, seen, picked)
    if params.temperature <= 0:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # always keeps the most likely token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    if params.min_p is not None and params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Completion:
    prompt: str
    completion: str
    tokens: int
    sum_logprob: float
    tokens_per_s: float
    stopped: str  # "eos" | "stop" | "length"


def _decode_step(model, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model(token, input_pos=pos)[:, -1]


class Generator:
    """Generation for one model: owns the static cache and, on CUDA, the compiled decode step."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: str = "cpu", compile: bool | None = None):
        self.model, self.tok, self.device = model, tokenizer, device
        self.context = model.config.max_position_embeddings
        compile = device.startswith("cuda") if compile is None else compile
        self.step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True) if compile else _decode_step
        self.cache_shape: tuple[int, int] | None = None

    def _ensure_cache(self, batch: int) -> None:
        if self.cache_shape != (batch, self.context):  # one static shape: a CUDA graph is captured once
            self.model.setup_cache(batch, self.context, device=self.device)
            self.cache_shape = (batch, self.context)

    @torch.no_grad()
    def generate(self, prompt: str, params: SamplingParams, *, num_samples: int = 1,
                 on_text: Callable[[str], None] | None = None) -> list[Completion]:
        ids = self.tok.encode(prompt, bos=self.tok.bos_id is not None and getattr(self.tok, "add_bos", True))
        budget = self.context - params.max_new_tokens
        if budget < 1:
            from gentool.errors import UsageProblem

            raise UsageProblem(f"--max-new-tokens {params.max_new_tokens} leaves no room in the context "
                               f"({self.context})", hint="lower --max-new-tokens")
        if len(ids) > budget:
            console.warn(f"prompt of {len(ids)} tokens truncated from the left to {budget} (context {self.context})")
            ids = ids[-budget:]
        if not ids:
            ids = [self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id]
        b = num_samples
        self._ensure_cache(b)
        gen = torch.Generator(device=self.device).manual_seed(params.seed)
        prompt_t = torch.tensor([ids] * b, device=self.device)
        t0 = time.time()
        logits = self.model(prompt_t, input_pos=torch.arange(len(ids), device=self.device))[:, -1]
        eos = torch.tensor(sorted(getattr(self.tok, "eos_ids", {self.tok.eos_id}) - {None}) or [-1],
                           device=self.device)
        seen = prompt_t.clone()
        out = torch.empty(b, 0, dtype=torch.long, device=self.device)
        logprob = torch.zeros(b, dtype=torch.float64, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        stopped = ["length"] * b
        shown = ""
        texts = [""] * b
        for i in range(params.max_new_tokens):
            nxt = pick(process_logits(logits, params, seen), params, gen)
            nxt = torch.where(done, eos[0].clamp_min(0), nxt)
            logprob += torch.where(done, 0.0, logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
                                   .double())
            is_eos = torch.isin(nxt, eos) & ~done
            out = torch.cat([out, nxt[:, None]], 1)
            seen = torch.cat([seen, nxt[:, None]], 1)
            for j in is_eos.nonzero().flatten().tolist():
                stopped[j] = "eos"
            done |= is_eos
            if params.stop or on_text:
                for j in range(b):
                    if stopped[j] != "length" and not is_eos[j]:
                        continue
                    keep = out[j].tolist()
                    if stopped[j] == "eos":
                        keep = keep[:-1]
                    texts[j] = self.tok.decode(keep)
                    hit = next((s for s in params.stop if s in texts[j]), None)
                    if hit is not None and stopped[j] == "length":
                        texts[j] = texts[j][:texts[j].index(hit)]
                        stopped[j] = "stop"
                        done[j] = True
                if on_text and not texts[0].endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                    on_text(texts[0][len(shown):])
                    shown = texts[0]
            if bool(done.all()) or i == params.max_new_tokens - 1:
                break
            logits = self.step(self.model, nxt[:, None], torch.tensor([len(ids) + i], device=self.device)).clone()
        dt = time.time() - t0
        results = []
        for j in range(b):
            toks = out[j].tolist()
            if stopped[j] == "eos":
                toks = toks[:toks.index(next(t for t in toks if t in eos.tolist()))]
            text = texts[j] if stopped[j] == "stop" else self.tok.decode(toks)
            results.append(Completion(prompt, text, len(toks), float(logprob[j]), len(toks) / max(dt, 1e-9),
                                      stopped[j]))
        if on_text and len(results[0].completion) > len(shown):
            on_text(results[0].completion[len(shown):])
        return results


def measure_copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device copy (bytes read + written), the roofline of batch-1 decoding."""
    n = (1 << 28) if device.startswith("cuda") else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        b.copy_(a)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n * reps / (time.perf_counter() - t0)
