"""Autoregressive sampling with a static KV cache: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The decode step is one function over fixed-shape state (`DecodeState`): forward one token per row, filter the
logits, draw the next token, record it and its log-probability, advance the position. Nothing in it syncs with
the host or changes shape, so on CUDA `torch.compile(mode="reduce-overhead")` captures the whole step, sampling
included, as one CUDA graph over the static cache (gpt-fast's recipe, taken one step further); the host only
replays it and looks at the tokens every few steps. On a CPU the same step runs eagerly, or compiled by inductor
(`compile=True`: no CUDA graphs; the matrix-vector products become streaming loops, models/decode.py), and greedy
decoding of one row can check tokens drafted from its own text in one forward (`prompt_lookup`).

Randomness is counter-based: the Gumbel noise for row r, generation step n and token v is a hash of
(seed, sample index, n, v), so `--seed` alone fixes the output, a prompt's samples do not depend on what else is
in the batch, and no generator state lives outside the graph.

Prompts of different lengths share a batch with left padding; padded keys are masked out. Rotary embeddings only
see relative positions (q·k depends on i - j), so a row shifted right by its padding scores exactly as unpadded.
A prompt longer than the context window minus --max-new-tokens is truncated from the left, with a warning.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from gentool import console
from gentool.errors import UsageProblem
from gentool.models import qkernel
from gentool.models.cpu_step import cpu_decoder
from gentool.models.decode import can_fuse, decode_forward, fuse_projections, pack_weights, use_onednn_linears
from gentool.models.transformer import Transformer

M32 = 0xFFFFFFFF
# Inductor on a CPU: store every pointwise result before its consumer rather than recompute it inside it. A
# matrix-vector product reads its input vector once per weight row, so an inlined RMSNorm or SiLU·up producer is
# recomputed rows x columns times (the fp32 decode step of SmolLM2-135M: 66 -> 56 ms per token; bench/cpu.py).
CPU_INDUCTOR = {"realize_opcount_threshold": 0}


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0        # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False        # benchmarks: always generate max_new_tokens


# --- logits processors (transformers' order: repetition penalty, temperature, top-k, top-p, min-p) -----------------
def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> filtered, temperature-scaled float32 logits, -inf where excluded. `seen` marks the tokens
    already in each row, as a (B, V) bool mask or a (B, N) tensor of ids, for the repetition penalty."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:  # CTRL (Keskar et al. 2019), as transformers does it
        if seen.dtype != torch.bool:
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, seen, True)
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature <= 0:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:  # smallest set of top tokens with mass >= top_p
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # mass strictly before a token: the top one always stays
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    if params.min_p is not None and params.min_p > 0:  # Nguyen et al. 2024: drop p < min_p * p_max
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Mueller's, constants below 2^31 so int64 products never overflow) of int64 tensors
    holding values in [0, 2^32)."""
    h = ((h >> 16) ^ h) * 0x45D9F3B & M32
    h = ((h >> 16) ^ h) * 0x45D9F3B & M32
    return (h >> 16) ^ h


def row_keys(seed: int, samples: list[int], device=None) -> torch.Tensor:
    """A 32-bit key per row from (seed, index of the sample within its prompt)."""
    s = torch.tensor([[seed & M32, (seed >> 32) & M32, j & M32] for j in samples], dtype=torch.long)
    h = _mix32(s[:, 0])
    h = _mix32((h ^ s[:, 1]) * 0x27D4EB2F & M32)
    return _mix32((h ^ s[:, 2]) * 0x165667B1 & M32).to(device)


def gumbel_noise(keys: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) standard Gumbel noise, a pure function of the row keys (B,), the step (1,) and the token id."""
    per_step = _mix32((keys ^ _mix32(step + 0x7FEB352D)) & M32)                   # (B,)
    v = torch.arange(vocab, device=keys.device)
    h = _mix32((per_step[:, None] ^ _mix32(v + 0x165667B1)[None, :]) & M32)     # (B, V)
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))                            # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample_tokens(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor, step: torch.Tensor
                  ) -> torch.Tensor:
    """Processed (B, V) logits -> (B,) token ids: argmax when greedy, else the Gumbel-max trick (an exact draw
    from softmax(logits); -inf logits are never picked)."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    return (logits + gumbel_noise(keys, step, logits.shape[-1])).argmax(-1)


# --- the decode state and step ------------------------------------------------------------------------------------
class DecodeState(nn.Module):
    """Everything a decode step reads and writes, as fixed-shape buffers (static addresses for a CUDA graph).
    B rows, S cache length (also the capacity of `out`), V vocab."""

    def __init__(self, batch: int, length: int, vocab: int, n_eos: int, device):
        super().__init__()
        z = dict(device=device)
        for name, shape, dtype in [("token", (batch, 1), torch.long), ("pos", (1,), torch.long),
                                   ("count", (1,), torch.long), ("out", (batch, length), torch.long),
                                   ("logprobs", (batch, length), torch.float32), ("seen", (batch, vocab), torch.bool),
                                   ("done", (batch,), torch.bool), ("keys", (batch,), torch.long),
                                   ("eos", (max(n_eos, 1),), torch.long), ("fill", (1,), torch.long),
                                   ("attn_mask", (batch, length), torch.bool)]:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, **z), persistent=False)
        self.padded = False

    def advance(self, logits: torch.Tensor, params: SamplingParams) -> None:
        """Raw (B, V) logits of the current token -> draw, record and feed back the next token."""
        logits = logits.float()
        penalise = params.repetition_penalty != 1.0
        if params.temperature <= 0 and not penalise and _fast_greedy(logits):  # one pass in C++ (CPU decoding)
            nxt, chosen = torch.ops.gentool_qk.greedy(logits)
        else:
            nxt = sample_tokens(process_logits(logits, params, self.seen if penalise else None), params, self.keys,
                                self.count)
            chosen = logits.log_softmax(-1).gather(-1, nxt[:, None])[:, 0]
        nxt = torch.where(self.done, self.fill, nxt)  # finished rows repeat a filler (their output is cut later)
        self.out.index_copy_(1, self.count, nxt[:, None])
        self.logprobs.index_copy_(1, self.count, chosen[:, None])
        if penalise:
            self.seen.scatter_(1, nxt[:, None], True)
        if not params.ignore_eos:
            self.done |= (nxt[:, None] == self.eos[None, :]).any(-1)
        self.token.copy_(nxt[:, None])
        self.pos += 1
        self.count += 1


def _fast_greedy(logits: torch.Tensor) -> bool:
    """Whether greedy choice and its log-probability come from the CPU kernel's one-pass op (eager, CPU)."""
    return logits.device.type == "cpu" and not torch.compiler.is_compiling() and qkernel.ENABLED and \
        qkernel.available()


def decode_step(model: nn.Module, state: DecodeState, params: SamplingParams, fused: bool = False) -> None:
    """One token per row: the unit captured as a CUDA graph. fused: the specialised forward of lm/decode.py."""
    mask = state.attn_mask if state.padded else None
    if fused:
        logits = decode_forward(model, state.token, state.pos, mask)
    else:
        logits = model(state.token, input_pos=state.pos, attention_mask=mask)[:, -1]
    state.advance(logits, params)


def cpu_decode_step(decoder, model: nn.Module, state: DecodeState, params: SamplingParams) -> None:
    """decode_step through the whole-step CPU decoder (batch 1, no padding); without a repetition penalty the draw
    and the bookkeeping too, in the same C++ call."""
    if decoder.advances and params.repetition_penalty == 1.0:
        decoder.advance(state, params)
    else:
        state.advance(decoder.step(state.token, state.pos), params)


# --- incremental detokenization and stop strings --------------------------------------------------------------------
class TextStream:
    """The text of one completion, released as soon as it is final.

    Decoding runs over a short window of ids (vLLM's prefix/read offsets), so each token costs O(1), and the window
    starts inside the context, so a SentencePiece word-initial space is kept. Text ending in an incomplete UTF-8
    sequence (byte-fallback tokens) is held back until the character completes; text that may be the beginning of
    a stop string is held back until it is known not to be. `text` is the completion; what `push`/`finish`
    return, concatenated, equals it."""

    def __init__(self, tok, context: list[int], stop: list[str] = ()):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids = list(context[-6:])
        self.prefix, self.read = 0, len(self.ids)
        self.text, self.shown, self.stopped = "", 0, None

    def _decode(self, final: bool) -> None:
        prev = self.tok.decode(self.ids[self.prefix:self.read])
        new = self.tok.decode(self.ids[self.prefix:])
        if len(new) > len(prev) and (final or not new.endswith("\ufffd")):
            self.text += new[len(prev):]
            self.prefix, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        if self.stopped is None:
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, self.shown)) >= 0]
            if hits:
                i, self.stopped = min(hits)
                self.text = self.text[:i]
        end = len(self.text)
        if not final and self.stopped is None:  # hold back a suffix that could start a stop string
            end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece, self.shown = self.text[self.shown:max(end, self.shown)], max(end, self.shown)
        return piece

    def push(self, token: int) -> str:
        if self.stopped is not None:
            return ""
        self.ids.append(int(token))
        self._decode(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped is None:
            self._decode(final=True)
        return self._release(final=True)


# --- prompt-lookup drafts -------------------------------------------------------------------------------------------
class PromptLookup:
    """Draft tokens for greedy decoding from the text so far (prompt lookup, Saxena 2023): the tokens that followed
    the most recent earlier occurrence of the longest suffix n-gram (n = max_ngram .. 1). An index from each n-gram
    to the position after its latest occurrence keeps a lookup O(1) per token."""

    def __init__(self, ids: list[int], max_ngram: int = 3):
        self.ids: list[int] = []
        self.max_ngram = max_ngram
        self.follow: list[dict] = [{} for _ in range(max_ngram + 1)]
        self.extend(ids)

    def extend(self, ids) -> None:
        for t in ids:
            self.ids.append(int(t))
            j = len(self.ids) - 1  # the n-grams ending just before position j are followed by ids[j]
            for n in range(1, min(self.max_ngram, j) + 1):
                self.follow[n][tuple(self.ids[j - n:j])] = j

    def draft(self, k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(self.ids)), 0, -1):
            j = self.follow[n].get(tuple(self.ids[-n:]))
            if j is not None:
                return self.ids[j:j + k]
        return []


# --- the generator ----------------------------------------------------------------------------------------------
@dataclass
class Completion:
    prompt: str
    completion: str
    tokens: int
    sum_logprob: float
    tokens_per_s: float
    stopped: str                    # "eos" | "stop" | "length"
    token_ids: list[int] = field(default_factory=list, repr=False)
    logprobs: list[float] = field(default_factory=list, repr=False)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Generator:
    """Generation for one model: owns the static KV cache, the decode state and, on CUDA, the compiled step.

    check_every: look at the generated tokens (EOS, stop strings) every this many steps; each look syncs with the
    device, so on CUDA it is 16 unless text is streamed (1 on CPU, where syncing is free).
    fuse: decode with fused projections (models/decode.py); default whenever the model allows it.
    prompt_lookup: greedy decoding of one row drafts up to this many tokens from its own text (`PromptLookup`) and
    checks them in one forward; the accepted ones are exactly the greedy choices, so the output is that of plain
    greedy decoding (up to floating-point ties between a one-token and a multi-token forward).
    On a CPU without `compile`, batch-1 decoding runs each token in one C++ call where the model allows it
    (models/cpu_step.py), the fastest path there."""

    def __init__(self, model: nn.Module, tokenizer, *, device: str = "cpu", compile: bool | str | None = None,
                 check_every: int | None = None, fuse: bool | None = None, prompt_lookup: int = 0):
        self.model, self.tok, self.device = model, tokenizer, device
        self.prompt_lookup = prompt_lookup
        self.fused = can_fuse(model) if fuse is None else fuse
        if self.fused:
            fuse_projections(model)
        if device == "cpu":
            use_onednn_linears(model)
            pack_weights(model.model if isinstance(model, Transformer) else model)  # prompts: not the 1-row head
        self.context = model.config.max_position_embeddings
        self.compile = device.startswith("cuda") if compile is None else compile
        self.check_every = check_every
        self.fast_cpu = not self.compile  # batch-1 CPU decoding in one C++ call per token, unless compiling
        self._cpu = None
        self.state: DecodeState | None = None
        self._steps: dict = {}
        self.stats: dict[str, float] = {}
        eos = set(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id}) - {None}
        self.eos = sorted(eos)
        if self.compile is True:
            configure_inductor()

    def _step_fn(self, params: SamplingParams) -> Callable:
        key = (params.temperature > 0, params.temperature, params.top_k, params.top_p, params.min_p,
               params.repetition_penalty, params.ignore_eos)
        if key not in self._steps:
            def step(model, state, _p=SamplingParams(**{**params.__dict__, "stop": []}), _fused=self.fused):
                decode_step(model, state, _p, _fused)
            if not self.compile:
                self._steps[key] = step
            else:  # True: inductor (+ CUDA graphs on CUDA); a string names another backend (tests: "eager")
                how = {"backend": self.compile} if isinstance(self.compile, str) else \
                    {"mode": "reduce-overhead"} if self.device.startswith("cuda") else {"options": CPU_INDUCTOR}
                self._steps[key] = torch.compile(step, fullgraph=True, dynamic=False, **how)
        return self._steps[key]

    def _prepare(self, batch: int, length: int) -> DecodeState:
        """Cache and state for (batch, length); reused (same addresses, same captured graph) while shapes match."""
        s = self.state
        if s is None or s.out.shape != (batch, length) or getattr(self.model, "max_seq_len", 0) != length:
            self.model.setup_cache(batch, length, device=self.device)
            s = self.state = DecodeState(batch, length, self.model.config.vocab_size, len(self.eos), self.device)
        if self.device == "cpu" and self.fast_cpu:  # over the model's current cache (another Generator may renew it)
            key = [id(m.kv_cache.k) for m in self.model.modules() if getattr(m, "kv_cache", None) is not None]
            if self._cpu is None or self._cpu[1] != key:  # the decoder keeps its cache alive: ids stay unique
                self._cpu = (cpu_decoder(self.model), key)
            if self.device.startswith("cuda"):
                for b in s.buffers():  # static inputs: the graph reads and writes them in place
                    torch._dynamo.mark_static_address(b)
        return s

    def encode(self, prompt: str | list[int], max_new_tokens: int, add_bos: bool = True) -> list[int]:
        """The prompt's ids (a list: ids already, e.g. a rendered chat), cut from the left to fit the context."""
        if isinstance(prompt, list):
            ids = list(prompt)
        else:
            bos = add_bos and self.tok.bos_id is not None and getattr(self.tok, "add_bos", True)
            ids = self.tok.encode(prompt, bos=bos)
        budget = self.context - max_new_tokens
        if budget < 1:
            raise UsageProblem(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the context "
                               f"window ({self.context} tokens)", hint=f"use --max-new-tokens {self.context - 1} "
                                                                        f"or less")
        if len(ids) > budget:
            console.warn(f"prompt of {len(ids)} tokens truncated from the left to {budget} (context window "
                         f"{self.context} minus --max-new-tokens {max_new_tokens})")
            ids = ids[-budget:]
        if not ids:  # an empty prompt without BOS: start from the end-of-text token
            ids = [self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id]
        return ids

    def generate(self, prompt: str, params: SamplingParams, *, num_samples: int = 1,
                 on_text: Callable[[str], None] | None = None, add_bos: bool = True) -> list[Completion]:
        """num_samples completions of one prompt, decoded as one batch. on_text streams the first one."""
        ids = self.encode(prompt, params.max_new_tokens, add_bos)
        return self.generate_ids([(prompt, ids)] * num_samples, params, samples=list(range(num_samples)),
                                 on_text=on_text)

    @torch.no_grad()
    def generate_ids(self, rows: list[tuple[str, list[int]]], params: SamplingParams, *,
                     samples: list[int] | None = None, on_text: Callable[[str], None] | None = None
                     ) -> list[Completion]:
        """One batch: rows of (prompt text, prompt ids), left-padded; samples[i] is row i's sample index (its
        random stream). on_text receives row 0's text as it becomes final."""
        b, n_new = len(rows), params.max_new_tokens
        width = max(len(ids) for _, ids in rows)
        length = min(self.context, _round_up(width + n_new, 64))  # a few shapes, so a few captured graphs
        s = self._prepare(b, length)
        pad = self.tok.pad_id if getattr(self.tok, "pad_id", None) is not None else 0
        prompt_t = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in rows], device=self.device)
        valid = torch.tensor([[False] * (width - len(ids)) + [True] * len(ids) for _, ids in rows],
                             device=self.device)
        s.padded = not bool(valid.all())
        s.attn_mask.zero_()[:, :width] = valid
        s.attn_mask[:, width:] = True
        s.out.zero_()
        s.logprobs.zero_()
        s.seen.zero_().scatter_(1, prompt_t, valid)
        s.done.zero_()
        s.keys.copy_(row_keys(params.seed, samples or list(range(b)), self.device))
        s.eos.fill_(-1)
        if self.eos:
            s.eos[:len(self.eos)] = torch.tensor(self.eos, device=self.device)
        s.fill.fill_(self.eos[0] if self.eos else pad)
        s.count.zero_()
        s.pos.fill_(width - 1)  # advance() moves it to the sampled token's position
        step = self._step_fn(params)
        if self._cpu and self._cpu[0] is not None and not s.padded:  # one C++ call per token (models/cpu_step.py)
            step = functools.partial(cpu_decode_step, self._cpu[0], params=params)
        streams = [TextStream(self.tok, ids, params.stop) for _, ids in rows]
        ends: list[int | None] = [None] * b       # tokens kept per row once finished
        why = ["length"] * b
        eos = set(self.eos) if not params.ignore_eos else set()
        lookup = PromptLookup(rows[0][1]) if (self.prompt_lookup > 0 and b == 1 and params.temperature <= 0
                                              and params.repetition_penalty == 1.0) else None
        check = 1 if lookup else self.check_every or (1 if on_text or not self.device.startswith("cuda") else 16)
        accepted = 0

        _sync(self.device)
        t0 = time.perf_counter()
        # unpadded: positions 0.. (None), which attend over the prompt's own keys without a mask (faster)
        pos, mask = (torch.arange(width, device=self.device), s.attn_mask) if s.padded else (None, None)
        if hasattr(self.model, "hidden_states"):  # the output layer for the last position only
            logits = self.model.lm_head(self.model.hidden_states(prompt_t, input_pos=pos, attention_mask=mask)[:, -1])
        else:
            logits = self.model(prompt_t, input_pos=pos, attention_mask=mask)[:, -1]
        s.advance(logits, params)
        _sync(self.device)
        t1 = time.perf_counter()
        n, read = 1, 0
        while True:
            if n - read >= check or n == n_new:
                new = s.out[:, read:n].tolist()  # the one sync per check
                if lookup:
                    lookup.extend(new[0])
                for r in range(b):
                    for k, t in enumerate(new[r], start=read):
                        if ends[r] is not None:
                            break
                        if t in eos:
                            ends[r], why[r] = k, "eos"
                            break
                        piece = streams[r].push(t)
                        if r == 0 and on_text and piece:
                            on_text(piece)
                        if streams[r].stopped is not None:
                            ends[r], why[r] = k + 1, "stop"
                            s.done[r] = True
                read = n
                if n == n_new or all(e is not None for e in ends):
                    break
            draft = lookup.draft(min(self.prompt_lookup, n_new - n - 1)) if lookup else []
            if draft:
                got = self._verify(s, draft)
                n += got
                accepted += got - 1
            else:
                step(self.model, s)
                n += 1
        _sync(self.device)
        t2 = time.perf_counter()
        self.stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": n - 1,
                      "decode_tokens_per_s": b * (n - 1) / max(t2 - t1, 1e-9), "draft_tokens_accepted": accepted}
        out, logprobs = s.out[:, :n].tolist(), s.logprobs[:, :n].double().tolist()
        results = []
        for r, (prompt, _) in enumerate(rows):
            end = n if ends[r] is None else ends[r]
            tail = streams[r].finish()
            if r == 0 and on_text and tail:
                on_text(tail)
            results.append(Completion(prompt, streams[r].text, end, float(sum(logprobs[r][:end])),
                                      end / max(t2 - t0, 1e-9), why[r], out[r][:end], logprobs[r][:end]))
        return results

    def _verify(self, s: DecodeState, draft: list[int]) -> int:
        """Greedy, one row: forward the current token and the draft in one pass over the cache, keep the draft's
        longest prefix that greedy decoding would have chosen, plus the model's own next token. Cache entries past
        the kept tokens are masked (keys <= query position) and overwritten later. Returns the tokens added."""
        tokens = torch.tensor([[int(s.token)] + draft], device=self.device)
        logits = self.model(tokens, input_pos=s.pos + torch.arange(len(draft) + 1, device=self.device))[0].float()
        pred = logits.argmax(-1).tolist()
        a = 0
        while a < len(draft) and draft[a] == pred[a]:
            a += 1
        new = torch.tensor(draft[:a] + [pred[a]], device=self.device)
        c = int(s.count)
        s.out[0, c:c + len(new)] = new
        s.logprobs[0, c:c + len(new)] = logits[:a + 1].log_softmax(-1).gather(-1, new[:, None])[:, 0]
        s.token.fill_(int(new[-1]))
        s.pos += len(new)
        s.count += len(new)
        return len(new)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def configure_inductor() -> None:
    """gpt-fast's settings: tune the generated kernels' launch parameters, reuse compiled graphs across runs."""
    import torch._inductor.config as ic

    ic.coordinate_descent_tuning = True
    ic.triton.unique_kernel_names = True
    ic.fx_graph_cache = True


# --- measuring ----------------------------------------------------------------------------------------------------
def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads: all but the input embedding (one row of it is read);
    a tied output head is counted once, as it is read in full; quantized layers count their codes and scales."""
    from gentool.models.quant import QuantLinear

    tensors = list(model.named_parameters(remove_duplicate=False))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            tensors += [(f"{name}.{k}", t) for k, t in m.stored().items()]
    seen, total = set(), 0
    for name, p in tensors:
        if "embed_tokens" in name or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def measure_copy_bandwidth(device: str) -> float:
    """Bytes moved per second (read + written) by a large device-to-device copy: the practical ceiling on memory
    traffic, and so the roofline of batch-1 decoding (about 2.95 TB/s on an H100 SXM)."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    t0, reps = time.perf_counter(), 20 if device.startswith("cuda") else 5
    for _ in range(reps):
        b.copy_(a)
    _sync(device)
    return 2 * n * reps / (time.perf_counter() - t0)


def benchmark(gen: Generator, params: SamplingParams, prompt_ids: list[int], *, bandwidth: float | None = None
              ) -> dict:
    """Batch-1 decode speed against the bandwidth roofline: a warm-up run (compiles, captures), then a timed one
    that always generates max_new_tokens."""
    p = SamplingParams(**{**params.__dict__, "stop": [], "ignore_eos": True})
    gen.generate_ids([("", prompt_ids)], p)
    gen.generate_ids([("", prompt_ids)], p)
    tps = gen.stats["decode_tokens_per_s"]
    weight_bytes = decode_weight_bytes(gen.model)
    bw = bandwidth or measure_copy_bandwidth(gen.device)
    return {"device": gen.device, "tokens_per_s": tps, "weight_bytes_per_token": weight_bytes,
            "achieved_gb_s": tps * weight_bytes / 1e9, "copy_gb_s": bw / 1e9,
            "roofline_tokens_per_s": bw / weight_bytes, "pct_of_roofline": 100 * tps * weight_bytes / bw}
