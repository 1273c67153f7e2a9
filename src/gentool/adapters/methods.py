"""Model-merging methods for LoRA adapters and task vectors, with the semantics of PEFT's `add_weighted_adapter`.

Two spaces:
- factors: PEFT's `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the A matrices and the B
  matrices of the adapters separately (each weighted by ±√|w·s|, the sign on A), which needs equal ranks and gives
  a LoRA of that rank. Cheap, but not the weighted sum of the adapters' changes (cross terms B_i A_j appear).
- dense: the changes ΔW_i = s_i·B_i A_i (or θ_i − θ_base of a full fine-tune) are combined as tensors: task
  arithmetic Σ w_i ΔW_i (Ilharco et al. 2023), TIES (trim to the top-density magnitudes, elect the sign by total or
  frequency, disjoint mean; Yadav et al. 2023), DARE (drop at random with keep-probability `density`, rescale by
  1/density; Yu et al. 2024), magnitude pruning. PEFT's `svd`, `ties_svd`, `dare_*_svd`, `magnitude_prune_svd`
  then factor the result back to a target rank by truncated SVD; `cat` stacks the factors (rank Σ r_i, exact).

The tensor functions below follow peft/utils/merge_utils.py (Apache-2.0) step for step, and `peft_injection_draws`
first spends the random numbers PEFT spends creating the new adapter's layers, so seeded DARE draws the same masks
in the same order as `torch.manual_seed(seed); model.add_weighted_adapter(...)` on CPU (LoRA on linear layers;
init_lora_weights true, false or "gaussian"); only the random generator is passed explicitly instead of using the
global one. With one adapter PEFT merges linearly whatever the method (`single_adapter_method`).
"""

from __future__ import annotations

import math

import torch

from gentool.errors import UsageProblem

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("task_arithmetic", "cat", *FACTOR_METHODS, *SVD_METHODS)
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                   "dare_ties_svd", "magnitude_prune_svd")
SIGN_METHODS = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")


def dense_kind(method: str) -> str:
    """The dense combination a method applies to task vectors: task_arithmetic, ties, dare_linear, ..."""
    base = method.removesuffix("_svd")
    return "task_arithmetic" if base in ("svd", "linear", "cat", "task_arithmetic") else base


def check_method(method: str, density: float | None, majority_sign: str) -> None:
    if method not in METHODS:
        raise UsageProblem(f"unknown --method {method!r}", hint="choose " + ", ".join(METHODS))
    if method in DENSITY_METHODS:
        if density is None:
            raise UsageProblem(f"--method {method} needs --density (the fraction of values kept, in (0, 1])")
        if not 0.0 < density <= 1.0:
            raise UsageProblem(f"--density {density:g} is outside (0, 1]", hint="it is the fraction of values kept")
    elif density is not None:
        raise UsageProblem(f"--density does not apply to --method {method}",
                           hint="it is for " + ", ".join(DENSITY_METHODS))
    if majority_sign not in ("total", "frequency"):
        raise UsageProblem(f"unknown --majority-sign {majority_sign!r}", hint="use total or frequency")


def single_adapter_method(method: str, rank: int | None, dora: bool) -> str:
    """What one adapter is merged by: PEFT's add_weighted_adapter takes `linear` for a single adapter whatever the
    combination type (no pruning, no dropping; the weighted adapter itself). An explicit SVD --rank still truncates
    that change (`svd`); a DoRA adapter, which has no factor form, takes its exact change (`task_arithmetic`)."""
    if method not in DENSITY_METHODS and method not in SVD_METHODS:
        return method
    if rank is not None and method in SVD_METHODS:
        return "svd"
    return "task_arithmetic" if dora else "linear"


def peft_injection_draws(gen: torch.Generator, shapes: list[tuple[int, int]], rank: int, init) -> None:
    """Spend what PEFT's add_weighted_adapter spends from the global generator before its first DARE mask: injecting
    the new adapter creates, per target module (out, in) in the model's module order, lora_A = nn.Linear(in, r) and
    lora_B = nn.Linear(r, out) (each a kaiming-uniform draw of its weight), then re-initialises A by the first
    adapter's init_lora_weights (true: kaiming-uniform; "gaussian": normal; false: nothing)."""
    for out_f, in_f in shapes:
        torch.empty(rank, in_f).uniform_(generator=gen)
        torch.empty(out_f, rank).uniform_(generator=gen)
        if init is True:
            torch.empty(rank, in_f).uniform_(generator=gen)
        elif isinstance(init, str) and init.lower() == "gaussian":
            torch.empty(rank, in_f).normal_(generator=gen)


# --- peft/utils/merge_utils.py, with an explicit generator ---------------------------------------------------------

def magnitude_based_pruning(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) largest magnitudes (PEFT's top-k), zero the rest."""
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def random_pruning(t: torch.Tensor, density: float, rescale: bool, gen: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each value with probability `density` (a Bernoulli mask), optionally rescaled by 1/density."""
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    out = t * mask
    return out / density if rescale else out


def prune(t: torch.Tensor, density: float, method: str, rescale: bool = False,
          gen: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:  # PEFT: no pruning at all (and no random draws)
        return t
    return magnitude_based_pruning(t, density) if method == "magnitude" else random_pruning(t, density, rescale, gen)


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' elected sign per entry: of the summed values ("total") or of the sign votes ("frequency")."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks whose sign agrees with the elected one (entries of no task stay 0)."""
    return (stacked * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _weighted(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(tensors, dim=0)
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def combine(method: str, tensors: list[torch.Tensor], weights: list[float], *, density: float | None = None,
            majority_sign: str = "total", gen: torch.Generator | None = None) -> torch.Tensor:
    """One combined tensor from same-shape task tensors: task_arithmetic, ties, dare_linear, dare_ties or
    magnitude_prune (PEFT's merge_utils functions of those names)."""
    w = torch.tensor(weights, dtype=tensors[0].dtype)
    if method == "task_arithmetic":
        return _weighted(tensors, w).sum(dim=0)
    if method == "magnitude_prune":
        return _weighted([prune(t, density, "magnitude") for t in tensors], w).sum(dim=0)
    if method == "dare_linear":
        return _weighted([prune(t, density, "random", True, gen) for t in tensors], w).sum(dim=0)
    if method in ("ties", "dare_ties"):
        pruned = [prune(t, density, "magnitude") if method == "ties" else prune(t, density, "random", True, gen)
                  for t in tensors]
        mask = majority_sign_mask(torch.stack(pruned, dim=0), majority_sign)
        return disjoint_merge(_weighted(pruned, w), mask)
    raise AssertionError(method)


# --- low-rank factors ----------------------------------------------------------------------------------------------

def combine_factors(method: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
                    scalings: list[float], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factor-space merge of one module: A' from the A's weighted by sign·√|w·s|, B' from the B's by √|w·s|.
    The result is a LoRA pair with scaling 1 (PEFT writes the new adapter with lora_alpha = r)."""
    wa, wb = [], []
    for w, s in zip(weights, scalings):
        ws = w * s
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        wb.append(math.sqrt(abs(ws)))
    kind = "task_arithmetic" if method == "linear" else method
    a = combine(kind, [p[0] for p in pairs], wa, **kw)
    b = combine(kind, [p[1] for p in pairs], wb, **kw)
    return a, b


def lowrank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the product B A (out × in, rank ≤ k) from its k-column factors, without forming it:
    B = Q_b R_b, Aᵀ = Q_a R_a, R_b R_aᵀ = U' S V'ᵀ, so B A = (Q_b U') S (Q_a V')ᵀ."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return (qb @ u).float(), s.float(), (vh @ qa.T).float()


def svd_factors(delta: torch.Tensor | None, rank: int, *, clamp: float | None = None, factors=None,
                balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors of a change: (A (r, in), B (out, r), all singular values).

    PEFT's layout (`balanced=False`): B = U S, A = Vᵀ, then optionally clamped at the `clamp` quantile of their
    entries (PEFT's svd_clamp). `balanced` splits √S onto both factors (what extraction writes: equal scales train
    better). `factors=(B, A)` computes the SVD from low-rank factors instead of a dense `delta`.
    """
    if factors is not None:
        u, s, vh = lowrank_svd(*factors)
    else:
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    u, sr, vh_r = u[:, :rank], s[:rank], vh[:rank, :]
    if balanced:
        root = sr.sqrt()
        return root[:, None] * vh_r, u * root, s
    b, a = u @ torch.diag(sr), vh_r
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a, b, s


def energy_rank(s: torch.Tensor, energy: float, cap: int) -> int:
    """The smallest rank whose singular values hold `energy` of Σ s² (at least 1, at most `cap`)."""
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s.double() ** 2, 0) / total
    return max(1, min(cap, int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1))
