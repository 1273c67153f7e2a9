"""The masked-diffusion language model (MDLM, Sahoo et al. 2024), all of it: the forward process and its NELBO,
the training objective on token shards and its bound on windows of tokens. Sampling is in samplers.py, loading
and serving a checkpoint in serve.py, the block-diffusion variant (BD3-LM) in block.py.

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
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from gentool.artifacts.probe import MASKED_LM
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


def mask_counts(n: int, lo: int, hi: int | torch.Tensor, *, antithetic: bool = True,
                generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """n numbers of masks, uniform on {lo, ..., hi} (`hi` may differ per row: a tensor (n,)); antithetic draws are
    stratified as in sample_times."""
    if antithetic:
        u = (torch.rand((), generator=generator, device=device) + torch.arange(n, device=device) / n) % 1.0
    else:
        u = torch.rand(n, generator=generator, device=device)
    k = (u * (hi - lo + 1)).long()
    return lo + (k.clamp_max(hi - lo) if isinstance(hi, int) else torch.minimum(k, hi - lo))


def mask_exactly(x0: torch.Tensor, k: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
                 candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Mask k[...] positions of each row x0[..., :], chosen uniformly at random (among `candidates` where given)."""
    r = torch.rand(x0.shape, generator=generator, device=x0.device)
    if candidates is not None:
        r = r.masked_fill(~candidates, 2.0)  # ranked after every candidate: never masked
    ranks = r.argsort(-1).argsort(-1)
    return torch.where(ranks < k[..., None], torch.full_like(x0, mask_id), x0)


def count_weights(c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """c/k, the count estimator's weight for k masks among c candidates (0 where a row has no candidate)."""
    return torch.where(c > 0, c / k.clamp_min(1), torch.zeros((), device=c.device))


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
                       eps: float = 1e-3, estimator: str = "count", scored: torch.Tensor | None = None) -> torch.Tensor:
    """One Monte-Carlo draw of the NELBO in nats for each sequence of x0 (B, L).

    estimator "count" (the default): k masks, k uniform on 1..L, weight L/k. Integrating the continuous-time
    NELBO over t given k masked tokens gives int_0^1 (1/t) C(L,k) t^k (1-t)^(L-k) dt = 1/k, so
    NELBO = sum_k E[CE over the masks | k masked] / k (for any schedule: the continuous-time bound does not depend
    on it), and this draw is unbiased for it without the rare few-mask draws weighted by 1/t that make the
    per-token-Bernoulli estimator ("time", MDLM's) noisy. `steps`: the discrete-time bound of that schedule.
    `scored` (B, L) bool: only those positions are masked, the others are clean context, and the draw bounds
    -log p(x0[scored] | x0[~scored]) (the same derivation over the c scored positions: k uniform on 1..c, weight
    c/k); the rest of the row is what `score_nelbo` gives a window's tokens scored by an earlier window."""
    n, length = x0.shape
    if steps is None and estimator == "count" and scored is not None:
        c = scored.sum(1)
        k = mask_counts(n, 1, c, antithetic=antithetic, generator=generator, device=x0.device)
        w = count_weights(c, k)
        xt = mask_exactly(x0, k, mask_id, generator, scored)
    elif steps is None and estimator == "count":
        k = mask_counts(n, 1, length, antithetic=antithetic, generator=generator, device=x0.device)
        w = length / k
        xt = mask_exactly(x0, k, mask_id, generator)
    else:
        if steps is None:
            t = sample_times(n, antithetic=antithetic, eps=eps, generator=generator, device=x0.device)
            w = schedule.weight(t)
        else:
            t, s = discrete_times(n, steps, generator=generator, device=x0.device)
            w = steps * (schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t))
        xt = corrupt(x0, t, mask_id, schedule, generator)
        if scored is not None:
            xt = torch.where(scored, xt, x0)
    masked = xt == mask_id
    logits = model(xt)
    # cross-entropy only where masked; the mask logit is excluded (SUBS) by setting it to -inf
    logits = logits.float().masked_fill(
        F.one_hot(torch.tensor(mask_id, device=x0.device), logits.shape[-1]).bool(), -math.inf)
    nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (B, L)
    return w * (nll * masked).sum(dim=1)


def masked_diffusion_loss(model: Denoiser, x0: torch.Tensor, mask_id: int, schedule: MaskSchedule, *,
                          generator: torch.Generator | None = None, antithetic: bool = True,
                          estimator: str = "time") -> torch.Tensor:
    """Training loss: the NELBO in nats per token, averaged over the batch. MDLM's per-token masking ("time")
    by default: in bench/diffusion_lm.py it trained as well as the count estimator (whose lower variance is for
    the bound's estimates, below)."""
    return nelbo_per_sequence(model, x0, mask_id, schedule, antithetic=antithetic, generator=generator,
                              estimator=estimator).sum() / x0.numel()


PerSequence = Callable[..., torch.Tensor]  # (model, x0, mask_id, schedule, *, steps, generator) -> (B,) nats


@torch.no_grad()
def estimate_nelbo(model: Denoiser, windows: torch.Tensor, mask_id: int, schedule: MaskSchedule, *, samples: int = 1,
                   steps: int | None = None, batch_size: int = 8, generator: torch.Generator | None = None,
                   per_sequence: PerSequence = nelbo_per_sequence,
                   scored: torch.Tensor | None = None) -> tuple[float, float, int]:
    """(mean NELBO in nats/token, standard error, tokens) over windows (N, L), `samples` draws each; the error is
    that of the mean over windows and draws. `per_sequence` is the bound of one draw (block.py's for BD3-LMs).
    `scored` (N, L) bool: the positions each window scores (the others are context); the mean is then the ratio of
    the summed nats to the scored tokens, and its error the ratio estimator's."""
    nats, counts = [], []
    for _ in range(samples):
        for i in range(0, windows.shape[0], batch_size):
            x0 = windows[i:i + batch_size]
            if scored is None:
                nats.append(per_sequence(model, x0, mask_id, schedule, steps=steps, generator=generator).double().cpu())
                counts.append(torch.full((x0.shape[0],), float(x0.shape[1]), dtype=torch.float64))
            else:
                part = scored[i:i + batch_size]
                nats.append(per_sequence(model, x0, mask_id, schedule, steps=steps, generator=generator,
                                         scored=part).double().cpu())
                counts.append(part.sum(1).double().cpu())
    total, count = torch.cat(nats), torch.cat(counts)
    mean = (total.sum() / count.sum()).item()
    m = total.numel()
    # the ratio estimator's standard error; with equal counts, that of the mean of per-window means
    stderr = ((total - mean * count).pow(2).sum() / (m * (m - 1))).sqrt().item() / count.mean().item() \
        if m > 1 else math.nan
    tokens = windows.numel() if scored is None else int(scored.sum())
    return mean, stderr, tokens


# --- training ------------------------------------------------------------------------------------------------------

class MaskedLMTask(LMTask):
    """Windows of seq_len tokens; loss = MDLM's continuous-time NELBO (nats/token) with antithetic times; the
    validation loss is the bound `per_sequence` estimates (the count estimator)."""

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

    per_sequence: PerSequence = staticmethod(nelbo_per_sequence)  # the bound evaluate() reports

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        x0, noise_seed = batch
        g = torch.Generator(device=x0.device).manual_seed(noise_seed)
        return masked_diffusion_loss(model, x0, self.mask_id, self.schedule, generator=g)

    def eval_nats(self, model: torch.nn.Module) -> float:
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        return estimate_nelbo(model, self.eval_windows.to(self.device), self.mask_id, self.schedule, samples=1,
                              batch_size=self.micro, generator=g, per_sequence=self.per_sequence)[0]


def score_nelbo(model: torch.nn.Module, ids: torch.Tensor, *, seq_len: int, mask_id: int, schedule: str,
                samples: int, steps: int | None, batch_size: int, device: str, seed: int = 0,
                per_sequence: PerSequence = nelbo_per_sequence) -> dict[str, Any]:
    """The NELBO bound of every token of `ids` but the first (context only: the tokens AR perplexity scores, from
    the same stream), over windows of seq_len tokens: the AR windows of stride seq_len (evaluation.windows), each
    scoring its tokens after the ones an earlier window scored, which stay clean context; the last window ends
    at the last token, so no tail is dropped."""
    from gentool.evaluation.windows import plan_windows

    if len(ids) < seq_len:
        raise UsageProblem(f"the data holds fewer tokens than one window ({seq_len})", hint="pass more text")
    plan = plan_windows(len(ids), seq_len, seq_len)
    windows = torch.stack([ids[w.start:w.end] for w in plan]).to(device)
    scored = torch.arange(seq_len, device=device)[None] >= torch.tensor([w.score_from - w.start for w in plan],
                                                                          device=device)[:, None]
    g = torch.Generator(device=device).manual_seed(seed)
    mean, stderr, tokens = estimate_nelbo(model, windows, mask_id, MaskSchedule(schedule), samples=samples,
                                          steps=steps, batch_size=batch_size, generator=g,
                                          per_sequence=per_sequence, scored=scored)
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
