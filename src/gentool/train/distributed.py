"""DDP or FSDP2 under torchrun (gloo on CPU, NCCL on CUDA); a no-op in a single process."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(device: str, *, always: bool = False) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1, or any size with `always`: FSDP2 on one GPU
    still shards through a process group); returns this rank's device."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or (int(world) <= 1 and not always) or dist.is_initialized():
        return device
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(model: torch.nn.Module, device: str, *, amp: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 in place: each block of every ModuleList (the transformer layers) is one shard unit, the root holds
    the rest (embeddings, head, final norm). With `amp` (bf16) the gathered parameters are bf16 and gradients are
    reduced in float32; the sharded master weights and the optimizer state stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp is not None else \
        MixedPrecisionPolicy()
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (DTensor shards gathered: every rank must call this under FSDP)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in model.state_dict().items()}


def no_sync(model: torch.nn.Module, *, last: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last micro-batch of an
    accumulation."""
    if world_size() > 1 and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
    elif world_size() > 1 and not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_mean(t: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()


def all_reduce_min(t: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)


def all_reduce_max(t: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (end of a torchrun job), all ranks together: gloo aborts a rank whose peer tears
    its connections down first."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
