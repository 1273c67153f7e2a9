"""A toy task for the trainer's tests: next-token prediction on a noisy cyclic sequence with a tiny tied-embedding
model (a few hundred parameters). Batches are a pure function of (seed, step, micro, rank), as the Task protocol
asks. Run as a script it is the DDP worker: `python _toy.py WORKDIR WORLD ACCUM STEPS`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

V, D = 16, 8


class ToyModel(torch.nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.norm = torch.nn.LayerNorm(D)
        self.mix = torch.nn.Linear(D, D)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight      # tied: the checkpoint must store it once

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.mix(self.norm(self.embed(x))))))


def toy_model(seed: int = 0, dropout: float = 0.0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(dropout)


class ToyTask:
    def __init__(self, *, micro: int = 8, seq: int = 12, seed: int = 0, world: int = 1, nan_at: int | None = None,
                 interrupt_at: int | None = None, interrupt_signal: str = "SIGINT", device: str = "cpu"):
        self.micro, self.seq, self.seed, self.world, self.device = micro, seq, seed, world, device
        self.nan_at, self.interrupt_at, self.interrupt_signal = nan_at, interrupt_at, interrupt_signal
        self.tokens_per_micro = micro * seq
        self.flops_per_micro = 6.0 * 300 * micro * seq
        self.evaluations = 0

    def batch(self, step: int, micro: int, rank: int):
        if self.interrupt_at is not None and step == self.interrupt_at and micro == 0:
            import signal

            os.kill(os.getpid(), getattr(signal, self.interrupt_signal))  # what Ctrl-C (or a scheduler) does
        rng = np.random.default_rng([self.seed, step, micro * self.world + rank])
        start = rng.integers(0, V, size=(self.micro, 1))
        x = (start + np.arange(self.seq + 1)) % V
        noise = rng.random(x.shape) < 0.1
        x = np.where(noise, rng.integers(0, V, size=x.shape), x)
        return torch.from_numpy(x).to(self.device), self.nan_at is not None and step + 1 >= self.nan_at

    def loss(self, model, batch):
        x, poison = batch
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        return loss * float("nan") if poison else loss

    def evaluate(self, model):
        self.evaluations += 1
        with torch.no_grad():
            x, _ = self.batch(10**6, 0, 0)
            return {"val_loss": float(F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()))}


def _ddp_worker(rank: int, world: int, workdir: str, accum: int, steps: int) -> None:
    import torch.distributed as dist

    from gentool.train import TrainConfig, distributed, train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, task = toy_model(0), ToyTask(world=world)
    cfg = TrainConfig(steps=steps, grad_accum=accum, lr=1e-2, warmup=2, log_every=1)
    train(model, task, cfg, Path(workdir))
    if rank == 0:
        weights = {k: v.tolist() for k, v in model.state_dict().items()}
        (Path(workdir) / "weights.json").write_text(json.dumps(weights))
    distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    out, world, accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.multiprocessing.spawn(_ddp_worker, args=(world, out, accum, steps), nprocs=world, join=True)
