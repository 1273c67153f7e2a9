"""Log-probabilities of chosen tokens: the one computation behind continuation scoring (`evaluate`), preference
losses (DPO family) and masked SFT losses.

Everything is float32 whatever the model's dtype, and the head runs over chunks of rows so a (B·T, V) float32
logits tensor never exists. Works with and without autograd: post-training calls it inside the training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | logits[b, t]) as float32 (B, T). Positions whose target is negative (ignored) get 0."""
    safe = targets_BT.clamp_min(0)
    # rows of V contiguous logits: the vectorised log-sum-exp (a transposed (B, V, T) view sums serially, 10x worse)
    logp = -F.cross_entropy(logits_BTV.float().flatten(0, -2), safe.flatten(), reduction="none")
    return logp.view(safe.shape).masked_fill(targets_BT < 0, 0.0)


def next_token_logprobs(model: torch.nn.Module, input_ids_BT: torch.Tensor, *, chunk_rows: int = 4096,
                        **forward_kwargs) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) as float32 (B, T-1): the score of every token given the ones
    before it. Models with `hidden_states` (gentool's Transformer) run the output head per chunk of rows."""
    targets = input_ids_BT[:, 1:]
    if not hasattr(model, "hidden_states"):
        return token_logprobs(model(input_ids_BT[:, :-1], **forward_kwargs), targets)
    h_ND = model.hidden_states(input_ids_BT[:, :-1], **forward_kwargs).flatten(0, 1)
    y_N = targets.flatten()
    out = [token_logprobs(model.lm_head(h_ND[i:i + chunk_rows])[None], y_N[None, i:i + chunk_rows])[0]
           for i in range(0, len(y_N), chunk_rows)]
    return torch.cat(out).view(targets.shape)


def masked_sums(logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log-probabilities over the positions `mask` marks, and how many there are (both (B,))."""
    m = mask_BT.to(logp_BT.dtype)
    return (logp_BT * m).sum(-1), m.sum(-1)
