"""Supervised fine-tuning on masked example shards (`tokenize encode --format chat|prompt-completion`): the loss is
the mean negative log-likelihood of the masked tokens only, as TRL's SFTTrainer computes its assistant-only /
completion-only loss (a token is a target where the mask is 1; the mean is over all targets of the micro-batch).

Packing: each micro-batch row of `seq_len` tokens holds whole examples back to back (an example longer than a row
is cut to the row). They never see each other: positions restart at 0 in each example and attention is
block-diagonal causal (`Transformer.hidden_states(document_ids=...)`, SDPA with a boolean mask); a row's unused
tail is padding that no loss reads. Examples are drawn with replacement by a generator seeded with (seed, step,
micro-step, rank), so batches are a pure function of the step, as the loop's resume needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gentool.config import LMConfig
from gentool.data.examples import MaskedExamples, open_masked
from gentool.data.shards import TokenShards
from gentool.evaluation.logprobs import masked_sums, next_token_logprobs
from gentool.lm.train import Objective


def pack(rows: list[list[tuple[np.ndarray, np.ndarray]]], length: int, pad_id: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per list of (ids, mask) examples: (ids (B, L), document ids (B, L), target mask (B, L-1)). Target t
    (the token at t+1) counts where that token is masked and in the same example as position t. Document ids are
    None when no row holds two examples (the padding after an example is never read)."""
    b = len(rows)
    ids = np.full((b, length), pad_id, np.int64)
    doc = np.empty((b, length), np.int64)
    mask = np.zeros((b, length), bool)
    for r, row in enumerate(rows):
        doc[r] = -1 - r  # padding: its own example, which no loss reads
        at = 0
        for k, (x, m) in enumerate(row):
            n = min(len(x), length - at)
            ids[r, at:at + n], mask[r, at:at + n], doc[r, at:at + n] = x[:n], m[:n], k
            at += n
    doc_t = torch.from_numpy(doc)
    target = torch.from_numpy(mask[:, 1:]) & (doc_t[:, 1:] == doc_t[:, :-1])
    if all(len(row) <= 1 for row in rows):  # one example per row: plain causal attention (fused kernels) will do
        return torch.from_numpy(ids), None, target
    return torch.from_numpy(ids), doc_t, target


def fill_rows(draw, rows: int, length: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Greedy packing: examples from `draw()` fill each row in turn; one that does not fit starts the next row.
    `draw()` returning None means no more examples (the rows left are empty)."""
    out, pending = [], None
    for _ in range(rows):
        row, used = [], 0
        while used < length:
            ex = pending if pending is not None else draw()
            pending = None
            if ex is None:
                break
            if used and used + len(ex[0]) > length:
                pending = ex
                break
            row.append(ex)
            used += len(ex[0])
        out.append(row)
    return out


def nll(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the batch's targets and how many there are."""
    ids, doc, target = batch
    logp = next_token_logprobs(model, ids, **({} if doc is None else {"document_ids": doc[:, :-1]}))
    s, n = masked_sums(logp, target)
    return -s.sum(), n.sum()


class SFTTask:
    compile_loss = False

    def __init__(self, train: TokenShards, val: TokenShards | None, config: LMConfig, *, seq_len: int,
                 micro_batch: int, seed: int, world: int, device: str, eval_tokens: int):
        self.train = open_masked(train.manifest.path, "train", verify=False)
        self.val: MaskedExamples | None = None
        if "val" in train.contents["splits"]:
            self.val = open_masked(train.manifest.path, "val", verify=False)
        self.seq_len, self.micro, self.seed, self.world, self.device = seq_len, micro_batch, seed, world, device
        c = train.contents
        self.pad = next((int(c[k]) for k in ("pad_id", "eos_id") if c.get(k) is not None), 0)
        self.tokens_per_micro = micro_batch * seq_len
        self.flops_per_micro = float(config.train_flops_per_token(seq_len) * self.tokens_per_micro)
        self.eval_batches = []
        if self.val is not None and len(self.val):
            examples, total = [], 0
            for i in range(len(self.val)):
                examples.append(self.val.example(i))
                total += min(len(examples[-1][0]), seq_len)
                if total >= eval_tokens:
                    break
            it = iter(examples)
            rows = [row for row in fill_rows(lambda: next(it, None), len(examples), seq_len) if row]
            self.eval_batches = [pack(rows[i:i + micro_batch], seq_len, self.pad)
                                 for i in range(0, len(rows), micro_batch)]

    def batch(self, step: int, micro: int, rank: int):
        rng = np.random.default_rng([self.seed, step, micro * self.world + rank])
        rows = fill_rows(lambda: self.train.example(int(rng.integers(len(self.train)))), self.micro, self.seq_len)
        return tuple(None if t is None else t.to(self.device) for t in pack(rows, self.seq_len, self.pad))

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        s, n = nll(model, batch)
        return s / n.clamp_min(1)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.eval_batches:
            return {}
        was = model.training
        model.eval()
        total = count = 0.0
        for b in self.eval_batches:
            s, n = nll(model, tuple(None if t is None else t.to(self.device) for t in b))
            total, count = total + s.item(), count + n.item()
        model.train(was)
        return {"val_loss": total / max(count, 1)} if count else {}


class SFTObjective(Objective):
    """Next-token prediction on the masked tokens of packed examples."""

    def task(self, train: TokenShards, val: TokenShards | None, config: LMConfig, **kw: Any) -> SFTTask:
        return SFTTask(train, val, config, **kw)

    def recipe(self, shards: TokenShards) -> dict[str, Any]:
        return {"objective": "sft", "train_on": shards.contents.get("train_on")}

    def contents(self, shards: TokenShards, config: LMConfig, seq_len: int) -> dict[str, Any]:
        return {"objective": "sft"}
