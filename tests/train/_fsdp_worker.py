"""FSDP2 worker for test_fsdp.py, launched by torchrun (gloo on CPU, NCCL with --device cuda):

    python -m torch.distributed.run --standalone --nproc-per-node 2 _fsdp_worker.py OUT OPTIMIZER [DEVICE]

A tiny Transformer on the toy task, sharded per block: (a) trains STEPS steps; (b) the same run, Ctrl-C during
step 4 (state saved at step 4); (c) --resume of (b). Rank 0 writes the gathered final weights of (a) and (c)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from gentool.config import config_from_preset  # noqa: E402
from gentool.errors import GentoolError  # noqa: E402
from gentool.models.transformer import Transformer  # noqa: E402
from gentool.train import TrainConfig, distributed, train  # noqa: E402

_spec = importlib.util.spec_from_file_location("_toy", Path(__file__).with_name("_toy.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

STEPS = 6


def tiny_lm(device: str = "cpu") -> Transformer:
    with torch.device(device):
        model = Transformer(config_from_preset("tiny", vocab_size=toy.V))
    model.init_weights(0)
    return model


def cfg(optimizer: str, world: int, device: str = "cpu") -> TrainConfig:
    return TrainConfig(steps=STEPS, grad_accum=2 // world, lr=1e-2, warmup=2, log_every=1, save_every=2,
                       optimizer=optimizer, muon_lr=0.05, parallel="fsdp", device=device,
                       amp_dtype="float32" if device == "cpu" else None)   # CUDA: bf16 params, fp32 reduce


def main(out: str, optimizer: str, device: str = "cpu") -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    device = distributed.init_from_env(device, always=True)
    world, rank = distributed.world_size(), distributed.rank()
    model = tiny_lm(device)
    train(model, toy.ToyTask(world=world, device=device), cfg(optimizer, world, device), Path(out) / "a")
    assert distributed.is_sharded(model)
    full = distributed.full_state_dict(model)
    try:
        train(tiny_lm(device), toy.ToyTask(world=world, interrupt_at=3, device=device), cfg(optimizer, world, device),
              Path(out) / "b")
        raise SystemExit("the interrupt did not stop the run")
    except GentoolError as e:
        assert e.exit_code == 130, e
    resumed = tiny_lm(device)
    train(resumed, toy.ToyTask(world=world, device=device), cfg(optimizer, world, device), Path(out) / "b",
          resume=True)
    full_b = distributed.full_state_dict(resumed)
    if rank == 0:
        save_file({k: v.clone() for k, v in full.items()}, str(Path(out) / "a.st"))
        save_file({k: v.clone() for k, v in full_b.items()}, str(Path(out) / "b.st"))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
