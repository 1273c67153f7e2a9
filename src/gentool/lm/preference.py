"""Preference tuning on pair shards (`tokenize encode --format preference`): DPO (robust DPO with label smoothing),
IPO, SimPO and ORPO, each equal to TRL's on the same batch (DPOTrainer loss_type sigmoid/robust/ipo, CPOTrainer
loss_type simpo with cpo_alpha 0, ORPOTrainer), with TRL's logged names: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.

A micro-batch is `micro_batch` pairs as 2·B rows, prompt+chosen then prompt+rejected, right-padded (causal
attention: padding after a sequence changes nothing before it), cut to `seq_len`. Sequence log-probabilities are
sums over the answer's tokens (`gentool.evaluation.logprobs`); IPO, SimPO and ORPO use their per-token means.

The reference model of DPO and IPO costs no second copy and no forward pass per step: its log-probabilities of
every pair are computed once before the first step (with LoRA: the base with the adapters switched off; full
fine-tune: the initial weights) and kept in the run directory (`reference_logps.safetensors`, reused on
--resume). `reference_live` computes them in every step instead: with LoRA by switching the adapters off (still no
copy), for a full fine-tune from a frozen copy of the initial weights.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gentool import console
from gentool.config import LMConfig
from gentool.data.examples import PreferencePairs, open_pairs
from gentool.data.shards import TokenShards
from gentool.errors import UsageProblem
from gentool.evaluation.logprobs import masked_sums, next_token_logprobs
from gentool.lm.train import Objective

LOSSES = ("dpo", "ipo", "simpo", "orpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@dataclass
class PreferenceConfig:
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference_live: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UsageProblem(f"unknown --objective {self.loss!r}", hint="choose sft, " + ", ".join(LOSSES))
        if not self.beta > 0:
            raise UsageProblem(f"--beta {self.beta} is out of range", hint="give a positive beta, e.g. 0.1")
        if not 0 <= self.label_smoothing < 0.5:
            raise UsageProblem(f"--label-smoothing {self.label_smoothing} is out of range", hint="use 0 <= ε < 0.5")

    @property
    def needs_reference(self) -> bool:
        return self.loss in ("dpo", "ipo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def preference_loss(cfg: PreferenceConfig, chosen: torch.Tensor, rejected: torch.Tensor, n_chosen: torch.Tensor,
                    n_rejected: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                    ref_rejected: torch.Tensor | None = None, chosen_nll: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch loss and TRL's metrics from summed answer log-probs (B,) and answer lengths (B,). References for
    dpo/ipo; `chosen_nll` (the mean NLL of the prompt+chosen tokens) for orpo."""
    b, eps = cfg.beta, cfg.label_smoothing
    if cfg.needs_reference:
        cl, rl = chosen - ref_chosen, rejected - ref_rejected
        if cfg.loss == "dpo":  # robust DPO (Chowdhury et al.); ε = 0 is the sigmoid loss
            d = b * (cl - rl)
            losses = (-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps)
        else:  # IPO on per-token means of the log-ratios
            delta = cl / n_chosen.clamp_min(1) - rl / n_rejected.clamp_min(1)
            losses = (delta - 1 / (2 * b)) ** 2
        loss = losses.mean()
        rc, rr, lc, lr = b * cl.detach(), b * rl.detach(), chosen.detach(), rejected.detach()
    else:
        ca, ra = chosen / n_chosen.clamp_min(1), rejected / n_rejected.clamp_min(1)
        if cfg.loss == "simpo":
            z = b * (ca - ra - cfg.simpo_gamma / b)
            loss = (-F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps).mean()
        else:  # orpo: NLL of chosen minus β·log σ(log odds ratio)
            log_odds = (ca - ra) - (log1mexp(ca) - log1mexp(ra))
            loss = chosen_nll - (b * F.logsigmoid(log_odds)).mean()
        rc, rr, lc, lr = b * ca.detach(), b * ra.detach(), ca.detach(), ra.detach()
    metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
               "rewards/accuracies": (rc > rr).float().mean(), "logps/chosen": lc.mean(), "logps/rejected": lr.mean()}
    return loss, metrics


def collate(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_len: int, pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (2B, L), answer mask (2B, L), valid mask (2B, L)): chosen rows first, then rejected, right-padded."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    length = min(max_len, max(len(p) + len(a) for p, a in seqs))
    ids = np.full((len(seqs), length), pad_id, np.int64)
    answer = np.zeros((len(seqs), length), bool)
    valid = np.zeros((len(seqs), length), bool)
    for i, (p, a) in enumerate(seqs):
        row = np.concatenate([p, a])[:length]
        ids[i, :len(row)] = row
        answer[i, len(p):len(row)] = True
        valid[i, :len(row)] = True
    return torch.from_numpy(ids), torch.from_numpy(answer), torch.from_numpy(valid)


def sequence_logps(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed answer log-prob, answer length, and the token log-probs (2B, L-1) themselves."""
    ids, answer, _ = batch[:3]
    logp = next_token_logprobs(model, ids)
    s, n = masked_sums(logp, answer[:, 1:])
    return s, n, logp


class PreferenceTask:
    compile_loss = False

    def __init__(self, train: TokenShards, val: TokenShards | None, config: LMConfig, *, seq_len: int,
                 micro_batch: int, seed: int, world: int, device: str, eval_tokens: int, cfg: PreferenceConfig):
        self.cfg = cfg
        self.pairs = {"train": open_pairs(train.manifest.path, "train", verify=False)}
        if "val" in train.contents["splits"]:
            self.pairs["val"] = open_pairs(train.manifest.path, "val", verify=False)
        self.seq_len, self.micro, self.seed, self.world, self.device = seq_len, micro_batch, seed, world, device
        c = train.contents
        self.pad = next((int(c[k]) for k in ("pad_id", "eos_id") if c.get(k) is not None), 0)
        self.tokens_per_micro = 2 * micro_batch * seq_len
        self.flops_per_micro = float(config.train_flops_per_token(seq_len) * self.tokens_per_micro)
        self.reference: dict[str, torch.Tensor] | None = None   # split -> (N, 2) precomputed reference logps
        self.ref_model: torch.nn.Module | None = None
        self.lora = False
        self._logged: dict[str, list[float]] = {}
        val = self.pairs.get("val")
        self.eval_index = list(range(min(len(val), max(1, eval_tokens // seq_len)))) if val is not None else []

    # --- the reference ------------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, workdir: Path, *, lora: bool) -> None:
        """Set up the reference before the first step (see the module's docstring)."""
        self.lora = lora
        if not self.cfg.needs_reference:
            return
        if self.cfg.reference_live:
            if not lora:
                self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            return
        from safetensors.torch import load_file, save_file

        path = Path(workdir) / "reference_logps.safetensors"
        if path.is_file():
            self.reference = load_file(str(path))
            if all(self.reference.get(s) is not None and len(self.reference[s]) == len(p)
                   for s, p in self.pairs.items()):
                return
        console.log("computing the reference log-probabilities of every pair once")
        was = model.training
        model.eval()
        out = {}
        from gentool.models.lora import adapters_disabled

        with torch.no_grad(), adapters_disabled(model):
            for split, pairs in self.pairs.items():
                rows = []
                for i in range(0, len(pairs), self.micro):
                    idx = list(range(i, min(i + self.micro, len(pairs))))
                    s, _, _ = sequence_logps(model, self._collate(pairs, idx))
                    rows.append(torch.stack(s.float().cpu().chunk(2), 1))
                out[split] = torch.cat(rows)
        model.train(was)
        from gentool.train import distributed

        if distributed.rank() == 0:  # every rank computed the same values; one writes them (for --resume)
            tmp = path.with_suffix(".tmp")
            save_file(out, str(tmp))
            os.replace(tmp, path)
        distributed.barrier()
        self.reference = out

    def _reference(self, model, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is not None:
            ref = self.reference[split][batch[3]].to(self.device)
            return ref[:, 0], ref[:, 1]
        with torch.no_grad():
            if self.ref_model is not None:
                s, _, _ = sequence_logps(self.ref_model, batch)
            else:
                from gentool.models.lora import adapters_disabled

                with adapters_disabled(model):
                    s, _, _ = sequence_logps(model, batch)
        return s.chunk(2)

    # --- batches and the loss -----------------------------------------------------------------------------------
    def _collate(self, pairs: PreferencePairs, idx: list[int]):
        ids, answer, valid = collate([pairs.pair(i) for i in idx], self.seq_len, self.pad)
        return ids.to(self.device), answer.to(self.device), valid.to(self.device), torch.tensor(idx)

    def batch(self, step: int, micro: int, rank: int):
        rng = np.random.default_rng([self.seed, step, micro * self.world + rank])
        pairs = self.pairs["train"]
        return self._collate(pairs, [int(i) for i in rng.integers(len(pairs), size=self.micro)])

    def compute(self, model, batch, split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref_c = ref_r = nll = None
        if self.cfg.needs_reference:  # first: its temporaries are gone before the policy's activations exist
            ref_c, ref_r = self._reference(model, batch, split)
        s, n, logp = sequence_logps(model, batch)
        chosen, rejected = s.chunk(2)
        nc, nr = n.chunk(2)
        if self.cfg.loss == "orpo":  # TRL's ORPO: the NLL over the whole prompt+chosen sequence
            valid = batch[2][:len(chosen), 1:]
            vs, vn = masked_sums(logp[:len(chosen)], valid)
            nll = -vs.sum() / vn.sum().clamp_min(1)
        return preference_loss(self.cfg, chosen, rejected, nc, nr, ref_c, ref_r, nll)

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        loss, metrics = self.compute(model, batch)
        for k, v in metrics.items():
            self._logged.setdefault(k, []).append(v.detach())
        return loss

    def log_metrics(self) -> dict[str, float]:
        """TRL's metrics, averaged over the micro-batches since the last log line."""
        out = {k: torch.stack(v).float().mean().item() for k, v in self._logged.items() if v}
        self._logged = {}
        return out

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.eval_index:
            return {}
        was = model.training
        model.eval()
        sums: dict[str, float] = {}
        total = 0.0
        pairs = self.pairs["val"]
        for i in range(0, len(self.eval_index), self.micro):
            idx = self.eval_index[i:i + self.micro]
            loss, metrics = self.compute(model, self._collate(pairs, idx), "val")
            total += loss.item() * len(idx)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
        model.train(was)
        n = len(self.eval_index)
        return {"val_loss": total / n, **{f"val_{k}": v / n for k, v in sums.items()}}


class PreferenceObjective(Objective):
    def __init__(self, cfg: PreferenceConfig):
        self.cfg = cfg
        self._task: PreferenceTask | None = None

    def task(self, train: TokenShards, val: TokenShards | None, config: LMConfig, **kw: Any) -> PreferenceTask:
        self._task = PreferenceTask(train, val, config, cfg=self.cfg, **kw)
        return self._task

    def prepare(self, model: torch.nn.Module, workdir: Path, *, lora: bool) -> None:
        self._task.prepare(model, workdir, lora=lora)

    def recipe(self, shards: TokenShards) -> dict[str, Any]:
        c = self.cfg
        return {"objective": c.loss, "beta": c.beta, "label_smoothing": c.label_smoothing,
                **({"simpo_gamma": c.simpo_gamma} if c.loss == "simpo" else {}),
                **({"reference_live": True} if c.reference_live else {})}

    def contents(self, shards: TokenShards, config: LMConfig, seq_len: int) -> dict[str, Any]:
        return {"objective": self.cfg.loss}


def objective_for(tokens_dir: Path, name: str | None, **kw: Any) -> Objective | None:
    """The objective a run on these shards trains: None (next-token prediction) on text, SFT on masked examples,
    the named preference loss on pairs. Refuses a mismatch."""
    from gentool.data.examples import MASKED, shards_format
    from gentool.lm.sft import SFTObjective

    fmt = shards_format(tokens_dir)
    if fmt == "preference":
        if name in (None, "sft"):
            raise UsageProblem("the token shards hold preference pairs", path=tokens_dir,
                               hint="pass --objective dpo, ipo, simpo or orpo")
        return PreferenceObjective(PreferenceConfig(name, **kw))
    if name == "sft" and fmt not in MASKED:
        raise UsageProblem(f"--objective sft needs masked example shards, and these hold {fmt} data",
                           path=tokens_dir, hint="encode with gentool tokenize encode --format chat|prompt-completion")
    if name not in (None, "sft"):
        raise UsageProblem(f"--objective {name} needs preference pairs, and these shards hold {fmt} data",
                           path=tokens_dir, hint="encode pairs with gentool tokenize encode --format preference")
    return SFTObjective() if fmt in MASKED else None
