"""The masked-diffusion LM (MDLM) on gentool's transformer: a training task, the NELBO on the AR scale, sampling.

The model is the train-lm Transformer with bidirectional attention and one extra vocabulary entry, the mask token
(mask_id = the tokenizer's vocabulary size). No time conditioning: MDLM shows it is not needed, and it lets the
sampler skip network calls when nothing changed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gentool.data.shards import TokenShards
from gentool.diffusion.masked import MaskSchedule, estimate_nelbo, masked_diffusion_loss

FAMILY = "masked-lm"


class MaskedLMTask:
    """Windows of seq_len tokens; loss = the continuous-time NELBO (nats/token) with antithetic times."""

    def __init__(self, train: TokenShards, val: TokenShards | None, config, *, seq_len: int, micro_batch: int,
                 seed: int, world: int, device: str, eval_tokens: int, mask_id: int, schedule: str = "loglinear"):
        self.train, self.seq_len, self.micro, self.seed, self.world = train, seq_len, micro_batch, seed, world
        self.device, self.mask_id, self.schedule = device, mask_id, MaskSchedule(schedule)
        self.tokens_per_micro = micro_batch * seq_len
        # bidirectional attention costs twice the causal attention term of the AR formula
        extra = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
        self.flops_per_micro = float((config.train_flops_per_token(seq_len) + extra) * self.tokens_per_micro)
        self.eval_windows = None
        if val is not None and len(val) >= seq_len:
            n = max(1, min(eval_tokens, len(val)) // seq_len)
            self.eval_windows = torch.from_numpy(val.tokens(0, n * seq_len)).view(n, seq_len)
        self.bytes_per_token = val.bytes / max(1, len(val)) if val is not None else None

    def batch(self, step: int, micro: int, rank: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, step, micro * self.world + rank])
        starts = rng.integers(0, len(self.train) - self.seq_len, size=self.micro)
        rows = np.stack([self.train.tokens(int(s), int(s) + self.seq_len) for s in starts])
        return torch.from_numpy(rows).to(self.device), int(rng.integers(0, 2**62))

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        x0, noise_seed = batch
        g = torch.Generator(device=x0.device).manual_seed(noise_seed)
        return masked_diffusion_loss(model, x0, self.mask_id, self.schedule, generator=g)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.eval_windows is None:
            return {}
        was = model.training
        model.eval()
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        nats, _, _ = estimate_nelbo(model, self.eval_windows.to(self.device), self.mask_id, self.schedule,
                                    samples=1, batch_size=self.micro, generator=g)
        model.train(was)
        out = {"val_loss": nats}
        if self.bytes_per_token:
            out["val_bpb"] = nats / math.log(2) / self.bytes_per_token
        return out


def score_nelbo(model: torch.nn.Module, ids: torch.Tensor, *, seq_len: int, mask_id: int, schedule: str,
                samples: int, steps: int | None, batch_size: int, device: str, seed: int = 0) -> dict[str, Any]:
    """The NELBO bound over non-overlapping windows of seq_len tokens (the tail shorter than a window is dropped)."""
    n = len(ids) // seq_len
    if n == 0:
        from gentool.errors import UsageProblem

        raise UsageProblem(f"the data holds fewer tokens than one window ({seq_len})", hint="pass more text")
    windows = ids[: n * seq_len].view(n, seq_len).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    mean, stderr, tokens = estimate_nelbo(model, windows, mask_id, MaskSchedule(schedule), samples=samples,
                                          steps=steps, batch_size=batch_size, generator=g)
    return {"nll": mean, "nll_stderr": stderr, "tokens": tokens, "samples": samples,
            "bound": "continuous-time" if steps is None else f"discrete T={steps}"}
