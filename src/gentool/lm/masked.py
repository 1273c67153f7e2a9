"""The masked-diffusion language model (MDLM, Sahoo et al. 2024), all of it: the forward process and its NELBO,
the training objective on token shards, scoring on the AR scale, and ancestral sampling.

The model is the train-lm Transformer with bidirectional attention and one extra vocabulary entry, the mask token
(mask_id = the tokenizer's vocabulary size). No time conditioning: MDLM shows it is not needed, and it lets the
sampler skip network calls when nothing changed. The checkpoint is a diffusion-checkpoint of family "masked-lm".

Legend: B batch, L sequence length, V vocabulary including the mask token.

Forward process: each token of x0 is replaced by [MASK] independently with probability 1 - alpha(t), t in [0, 1].
SUBS parametrisation: the denoiser never predicts [MASK] (its logit is -inf) and copies unmasked tokens through, so
the negative ELBO reduces to a weighted cross-entropy over the masked positions:

    NELBO = E_t [ w(t) * sum_{l masked} -log p_theta(x0_l | x_t) ],   w(t) = -alpha'(t) / (1 - alpha(t))

(log-linear schedule alpha(t) = 1 - t gives w(t) = 1/t). With T discrete steps the weight becomes
T * (alpha(s) - alpha(t)) / (1 - alpha(t)) at t = i/T, s = (i-1)/T, a looser bound that tends to the continuous one.
A denoiser is any callable mapping (B, L) token ids to (B, L, V) logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from gentool.artifacts import MASKED_LM, read_artifact
from gentool.data.shards import TokenShards
from gentool.errors import UsageProblem
from gentool.lm.train import LMRunOptions, LMTask, Objective, run_train_lm

Denoiser = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskSchedule:
    """alpha(t): the probability that a token is still unmasked at time t (alpha(0) = 1, alpha(1) = 0)."""

    kind: str = "loglinear"  # loglinear | cosine

    def __post_init__(self):
        if self.kind not in ("loglinear", "cosine"):
            raise ValueError(f"unknown mask schedule {self.kind!r} (loglinear or cosine)")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t if self.kind == "loglinear" else torch.cos(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)), the continuous-time NELBO weight."""
        if self.kind == "loglinear":
            return 1 / t
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1 - torch.cos(0.5 * math.pi * t))


def sample_times(n: int, *, antithetic: bool = True, eps: float = 1e-3, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """n times in [eps, 1]; antithetic (low-discrepancy) draws spread one uniform over n evenly spaced strata."""
    if antithetic:
        u = (torch.rand((), generator=generator, device=device) + torch.arange(n, device=device) / n) % 1.0
    else:
        u = torch.rand(n, generator=generator, device=device)
    return eps + (1 - eps) * u


def discrete_times(n: int, steps: int, *, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) pairs on the grid i/T with i uniform in 1..T."""
    i = torch.randint(1, steps + 1, (n,), generator=generator, device=device).float()
    return i / steps, (i - 1) / steps


def corrupt(x0: torch.Tensor, t: torch.Tensor, mask_id: int, schedule: MaskSchedule,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask each token of x0 (B, L) with probability 1 - alpha(t) (t is (B,))."""
    p_mask = (1 - schedule.alpha(t))[:, None]
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    return torch.where(u < p_mask, torch.full_like(x0, mask_id), x0)


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: log p_theta(x0 | x_t) (B, L, V) with the mask never predicted and unmasked tokens copied through."""
    logits = logits.float().clone()
    logits[..., mask_id] = -math.inf
    logp = F.log_softmax(logits, dim=-1)
    keep = xt != mask_id
    if keep.any():
        copied = torch.full_like(logp, -math.inf).scatter_(-1, xt.unsqueeze(-1), 0.0)
        logp = torch.where(keep.unsqueeze(-1), copied, logp)
    return logp


def nelbo_per_sequence(model: Denoiser, x0: torch.Tensor, mask_id: int, schedule: MaskSchedule, *,
                       steps: int | None = None, antithetic: bool = True, generator: torch.Generator | None = None,
                       eps: float = 1e-3) -> torch.Tensor:
    """One Monte-Carlo draw of the NELBO in nats for each sequence of x0 (B, L); continuous time unless `steps`."""
    n = x0.shape[0]
    if steps is None:
        t = sample_times(n, antithetic=antithetic, eps=eps, generator=generator, device=x0.device)
        w = schedule.weight(t)
    else:
        t, s = discrete_times(n, steps, generator=generator, device=x0.device)
        w = steps * (schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t))
    xt = corrupt(x0, t, mask_id, schedule, generator)
    masked = xt == mask_id
    logits = model(xt)
    # cross-entropy only where masked; the mask logit is excluded (SUBS) by setting it to -inf
    logits = logits.float().masked_fill(
        F.one_hot(torch.tensor(mask_id, device=x0.device), logits.shape[-1]).bool(), -math.inf)
    nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (B, L)
    return w * (nll * masked).sum(dim=1)


def masked_diffusion_loss(model: Denoiser, x0: torch.Tensor, mask_id: int, schedule: MaskSchedule, *,
                          generator: torch.Generator | None = None, antithetic: bool = True) -> torch.Tensor:
    """Training loss: the NELBO in nats per token, averaged over the batch."""
    return nelbo_per_sequence(model, x0, mask_id, schedule, antithetic=antithetic, generator=generator).sum() \
        / x0.numel()


@torch.no_grad()
def estimate_nelbo(model: Denoiser, windows: torch.Tensor, mask_id: int, schedule: MaskSchedule, *, samples: int = 1,
                   steps: int | None = None, batch_size: int = 8, generator: torch.Generator | None = None
                   ) -> tuple[float, float, int]:
    """(mean NELBO in nats/token, Monte-Carlo standard error, tokens) over windows (N, L), `samples` draws each."""
    per_token = []
    for _ in range(samples):
        for i in range(0, windows.shape[0], batch_size):
            x0 = windows[i:i + batch_size]
            nats = nelbo_per_sequence(model, x0, mask_id, schedule, steps=steps, generator=generator)
            per_token.append(nats.double().cpu() / x0.shape[1])
    values = torch.cat(per_token)
    mean = values.mean().item()
    stderr = (values.std(unbiased=True) / math.sqrt(values.numel())).item() if values.numel() > 1 else math.nan
    return mean, stderr, windows.numel()


def filter_probs(probs: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Top-k / nucleus filtering of (..., V) probabilities, renormalised (float64 stays float64)."""
    if top_k is not None and 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p is not None and 0 < top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1) / sorted_p.sum(-1, keepdim=True)
        drop_sorted = cum - sorted_p / sorted_p.sum(-1, keepdim=True) >= top_p  # keep the first token always
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64: float32 Gumbel noise truncates the tail and lowers the effective temperature
    (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models")."""
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64, device=probs.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (probs.double().log() + gumbel).argmax(-1)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, L)
    nfe: int              # network calls


@torch.no_grad()
def sample(model: Denoiser, z: torch.Tensor, mask_id: int, schedule: MaskSchedule, *, steps: int,
           cache: bool = True, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> SampleResult:
    """Ancestral unmasking from z (B, L): masked positions are generated, the others (a prompt) kept.

    From t to s < t each masked position unmasks with probability (alpha(s) - alpha(t)) / (1 - alpha(t)) and then
    takes a token drawn from p_theta(x0 | z). Without time conditioning the network's output only changes when z
    does, so with `cache` a step where nothing unmasked reuses the last probabilities (MDLM's caching sampler).
    Random draws are identical with and without caching, so both give the same samples under one seed.
    """
    z = z.clone()
    nfe = 0
    probs = None
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    changed = True
    for k in range(steps):
        t, s = times[k], times[k + 1]
        if probs is None or changed or not cache:
            logits = model(z).double()
            nfe += 1
            logits[..., mask_id] = -math.inf
            probs = filter_probs(F.softmax(logits / max(temperature, 1e-6), dim=-1), top_k, top_p)
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        p_unmask = ((a_s - a_t) / (1 - a_t)).item() if k < steps - 1 else 1.0
        u = torch.rand(z.shape, generator=generator, dtype=torch.float64, device=z.device)
        candidate = _categorical(probs, generator)
        unmask = (z == mask_id) & (u < p_unmask)
        changed = bool(unmask.any())
        z = torch.where(unmask, candidate, z)
    return SampleResult(z, nfe)


@torch.no_grad()
def sample_blocks(model: Denoiser, prompt: torch.Tensor, new_tokens: int, mask_id: int, schedule: MaskSchedule, *,
                  context: int, block: int, steps: int, **kwargs) -> SampleResult:
    """Semi-autoregressive generation of long texts: blocks of `block` masked tokens appended to the last
    `context - block` tokens and unmasked with `steps` steps each."""
    assert 0 < block <= context
    out = prompt.clone()
    nfe = 0
    remaining = new_tokens
    while remaining > 0:
        n = min(block, remaining)
        ctx = out[:, max(0, out.shape[1] - (context - n)):]
        z = torch.cat([ctx, torch.full((out.shape[0], n), mask_id, dtype=out.dtype, device=out.device)], dim=1)
        res = sample(model, z, mask_id, schedule, steps=steps, **kwargs)
        out = torch.cat([out, res.tokens[:, -n:]], dim=1)
        nfe += res.nfe
        remaining -= n
    return SampleResult(out, nfe)


# --- training ------------------------------------------------------------------------------------------------------

class MaskedLMTask(LMTask):
    """Windows of seq_len tokens; loss = the continuous-time NELBO (nats/token) with antithetic times."""

    compile_loss = False
    extra = 0

    def __init__(self, train: TokenShards, val: TokenShards | None, config, *, mask_id: int,
                 schedule: str = "loglinear", **kw: Any):
        super().__init__(train, val, config, **kw)
        self.mask_id, self.schedule = mask_id, MaskSchedule(schedule)
        # bidirectional attention costs twice the causal attention term of the AR formula
        extra = 6 * config.num_hidden_layers * self.seq_len * config.num_attention_heads * config.head_dim
        self.flops_per_micro += float(extra * self.tokens_per_micro)

    def batch(self, step: int, micro: int, rank: int) -> tuple[torch.Tensor, int]:
        rng, rows = self.windows(step, micro, rank)
        return rows.to(self.device), int(rng.integers(0, 2**62))

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        x0, noise_seed = batch
        g = torch.Generator(device=x0.device).manual_seed(noise_seed)
        return masked_diffusion_loss(model, x0, self.mask_id, self.schedule, generator=g)

    def eval_nats(self, model: torch.nn.Module) -> float:
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        return estimate_nelbo(model, self.eval_windows.to(self.device), self.mask_id, self.schedule, samples=1,
                              batch_size=self.micro, generator=g)[0]


def score_nelbo(model: torch.nn.Module, ids: torch.Tensor, *, seq_len: int, mask_id: int, schedule: str,
                samples: int, steps: int | None, batch_size: int, device: str, seed: int = 0) -> dict[str, Any]:
    """The NELBO bound over non-overlapping windows of seq_len tokens (the tail shorter than a window is dropped)."""
    n = len(ids) // seq_len
    if n == 0:
        raise UsageProblem(f"the data holds fewer tokens than one window ({seq_len})", hint="pass more text")
    windows = ids[: n * seq_len].view(n, seq_len).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    mean, stderr, tokens = estimate_nelbo(model, windows, mask_id, MaskSchedule(schedule), samples=samples,
                                          steps=steps, batch_size=batch_size, generator=g)
    return {"nll": mean, "nll_stderr": stderr, "tokens": tokens, "samples": samples,
            "bound": "continuous-time" if steps is None else f"discrete T={steps}"}


class MaskedObjective(Objective):
    """train-lm's loop with the masked-diffusion objective: bidirectional attention, one extra vocabulary entry
    (the mask, id = the tokenizer's vocabulary size), written as a diffusion-checkpoint of family masked-lm."""

    kind = "diffusion-checkpoint"
    causal = False
    extra_vocab = 1
    allows_init = False

    def __init__(self, schedule: str = "loglinear"):
        try:
            self.schedule = MaskSchedule(schedule).kind
        except ValueError as e:
            raise UsageProblem(str(e), hint="use --mask-schedule loglinear or cosine") from None

    def task(self, train: TokenShards, val: TokenShards | None, config, **kw: Any) -> MaskedLMTask:
        return MaskedLMTask(train, val, config, mask_id=train.vocab_size, schedule=self.schedule, **kw)

    def recipe(self, shards: TokenShards) -> dict[str, Any]:
        return {"family": MASKED_LM, "mask_id": shards.vocab_size, "schedule": self.schedule}

    def contents(self, shards: TokenShards, config, seq_len: int) -> dict[str, Any]:
        return {"family": MASKED_LM, "data_shape": {"seq_len": seq_len, "vocab_size": config.vocab_size,
                                                    "mask_id": shards.vocab_size},
                "schedule": self.schedule, "flops_formula": "6N+12LTd (bidirectional)"}


def train_masked_lm(opts: LMRunOptions, schedule: str = "loglinear") -> dict[str, Any]:
    """`gentool train-diffusion TOKENS --kind masked-lm`."""
    return run_train_lm(opts, MaskedObjective(schedule))


# --- a checkpoint: scoring and sampling ------------------------------------------------------------------------

@dataclass
class MaskedLM:
    model: torch.nn.Module
    tokenizer: Any
    seq_len: int
    mask_id: int
    schedule: MaskSchedule
    max_context: int


def load_masked_lm(checkpoint: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   verify: bool = True) -> MaskedLM:
    from gentool.data.tokenizer import load_tokenizer
    from gentool.models.checkpoint import load_lm

    manifest = read_artifact(checkpoint, "diffusion-checkpoint", verify=False)
    lm = load_lm(checkpoint, device=device, dtype=dtype, verify=verify, causal=False, kind="diffusion-checkpoint")
    shape = manifest.contents["data_shape"]
    tok = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else None
    return MaskedLM(lm.model, tok, shape["seq_len"], shape["mask_id"],
                    MaskSchedule(manifest.contents.get("schedule", "loglinear")), lm.config.max_position_embeddings)


def score_checkpoint(checkpoint: Path, data: list[str], *, split: str = "val", window: int | None = None,
                     max_tokens: int | None = None, batch_size: int = 8, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, allow_tokenizer_mismatch: bool = False, verify: bool = True,
                     samples: int = 1, steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """`gentool perplexity` of a masked-diffusion LM: its NELBO, an upper bound on the AR scale (nats per token,
    bits per byte), with the Monte-Carlo standard error, over non-overlapping windows."""
    from gentool.devices import dtype_name
    from gentool.evaluation.tokens import load_eval_tokens
    from gentool.lm.perplexity import check_window

    if not data:
        raise UsageProblem("no data to score", hint="pass a token-shards directory, text files, or - for stdin")
    m = load_masked_lm(checkpoint, device=device, dtype=dtype, verify=verify)
    window = check_window(window, m.max_context)
    ev = load_eval_tokens(data, m.tokenizer, vocab_size=m.mask_id + 1, split=split, max_tokens=max_tokens,
                          verify=verify, allow_tokenizer_mismatch=allow_tokenizer_mismatch, leading_eos=False,
                          where=checkpoint)
    out = score_nelbo(m.model, ev.ids, seq_len=min(window, m.seq_len), mask_id=m.mask_id, schedule=m.schedule.kind,
                      samples=samples, steps=steps, batch_size=batch_size, device=device, seed=seed)
    bpb = out["nll"] / math.log(2) / ev.bytes_per_token if ev.bytes_per_token else None
    return {"nll": out["nll"], "perplexity": math.exp(out["nll"]), "bits_per_byte": bpb,
            "nll_stderr": out["nll_stderr"], "tokens": out["tokens"], "samples": samples,
            "kind": f"upper bound (NELBO, {out['bound']})", **ev.source, "checkpoint": str(checkpoint),
            "dtype": dtype_name(dtype)}


def sample_texts(checkpoint: Path, prompts: list[str], *, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, num_samples: int, seed: int, device: str, steps: int,
                 cache: bool) -> Iterator[dict[str, Any]]:
    """Ancestral unmasking of max_new_tokens after each prompt (semi-autoregressive blocks beyond the window): one
    record per sample with its network calls (nfe) and speed."""
    if steps < 1:
        raise UsageProblem("--steps must be at least 1")
    m = load_masked_lm(checkpoint, device=device)
    if m.tokenizer is None:
        raise UsageProblem("the checkpoint has no tokenizer", path=checkpoint)
    gen = torch.Generator(device=device).manual_seed(seed)
    for prompt in prompts or [""]:
        ids = m.tokenizer.encode(prompt)[-(m.seq_len // 2):] if prompt else [m.tokenizer.eos_id]
        start = torch.tensor([ids] * num_samples, device=device)
        t0 = time.time()
        res = sample_blocks(m.model, start, max_new_tokens, m.mask_id, m.schedule, context=m.seq_len,
                            block=min(max_new_tokens, m.seq_len - len(ids)), steps=steps, cache=cache,
                            temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p, generator=gen)
        dt = time.time() - t0
        for row in res.tokens[:, len(ids):].tolist():
            yield {"prompt": prompt, "completion": m.tokenizer.decode(row), "tokens": len(row), "nfe": res.nfe,
                   "steps": steps, "cached": cache, "tokens_per_s": len(row) * num_samples / dt}
