"""The training loop: AdamW, schedule, accumulation, bf16 autocast on CUDA, clipping, eval, JSON-lines metrics,
atomic checkpoints with exact resume, Ctrl-C safety and a NaN stop, DDP under torchrun.

A Task supplies the data and the loss; batches are a pure function of (seed, step, micro-step, rank), so a resumed
run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from gentool import console
from gentool.errors import GentoolError
from gentool.train import distributed
from gentool.train.checkpoint import latest_state, load_state, save_state
from gentool.train.optim import build_optimizer, device_peak_flops, lr_at


class Task(Protocol):
    tokens_per_micro: int        # tokens (or samples) one micro-batch carries
    flops_per_micro: float       # training FLOPs of one micro-batch

    def batch(self, step: int, micro: int, rank: int) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


@dataclass
class TrainConfig:
    steps: int
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    keep: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    amp_dtype: str | None = None    # "bfloat16" on CUDA by default
    compile: bool = False
    ema_decay: float | None = None

    def recipe(self) -> dict[str, Any]:
        """What changes results (device, compile and logging cadence do not)."""
        d = asdict(self)
        for k in ("device", "compile", "log_every", "save_every", "keep"):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    step: int
    tokens: int
    flops: float
    train_loss: float
    eval: dict[str, float]
    seconds: float
    tokens_per_s: float
    mfu: float | None


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - decay)


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, workdir: Path, *, resume: bool = False,
          on_checkpoint: Callable[[int], None] | None = None, ema: torch.nn.Module | None = None) -> TrainResult:
    """Train in workdir (metrics.jsonl, state/step-N). Returns the final figures; raises GentoolError on NaN
    (exit 1) or interruption (exit 130) after saving what it can."""
    rank, world = distributed.rank(), distributed.world_size()
    device = cfg.device
    model.to(device)
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, device=device)
    start = 0
    state_dir, metrics_path = workdir / "state", workdir / "metrics.jsonl"
    if resume and (last := latest_state(state_dir)) is not None:
        meta = load_state(last, model=model, optimizer=opt, ema=ema)
        start = meta["step"]
        if rank == 0 and metrics_path.is_file():  # drop lines logged after the state we resume from
            lines = [l for l in metrics_path.read_text().splitlines() if l and json.loads(l)["step"] <= start]
            metrics_path.write_text("".join(l + "\n" for l in lines))
        console.log(f"resuming from {last} (step {start})")
    elif rank == 0:
        metrics_path.write_text("")
    train_model = distributed.wrap(model, device)
    step_fn = torch.compile(train_model) if cfg.compile else train_model
    amp = getattr(torch, cfg.amp_dtype) if cfg.amp_dtype else (torch.bfloat16 if device.startswith("cuda") else None)
    peak = device_peak_flops(device)
    tokens_per_step = task.tokens_per_micro * cfg.grad_accum * world
    flops_per_step = task.flops_per_micro * cfg.grad_accum * world
    t0, wall0 = time.time(), time.time()
    last_loss, evals, step = math.nan, {}, start
    running = torch.zeros((), device=device)

    def save(s: int) -> None:
        if rank == 0:
            save_state(state_dir, model=model, optimizer=opt, step=s, extra={"recipe": cfg.recipe()}, keep=cfg.keep,
                       ema=ema)
            if on_checkpoint:
                on_checkpoint(s)

    try:
        with console.progress("training", cfg.steps) as bar:
            bar.update(completed=start)
            for step in range(start, cfg.steps):
                lr = lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule,
                           min_ratio=cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = lr
                total = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = task.batch(step, micro, rank)
                    with distributed.no_sync(train_model, last=micro == cfg.grad_accum - 1), \
                            torch.autocast(device_type=device.split(":")[0], dtype=amp, enabled=amp is not None):
                        loss = task.loss(step_fn, batch) / cfg.grad_accum
                    loss.backward()
                    total += loss.detach()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                running = total
                finite = bool(torch.isfinite(total)) if device == "cpu" or (step + 1) % cfg.log_every == 0 \
                    else True
                if not finite:
                    raise GentoolError(f"loss is {total.item()} at step {step + 1}", path=workdir,
                                       hint="lower --lr or check the data; the last good checkpoint is kept in state/")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    _ema_update(ema, model, cfg.ema_decay or 0.999)
                done = step + 1
                is_eval = cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps)
                if done % cfg.log_every == 0 or done == cfg.steps or is_eval:
                    distributed.all_reduce_mean(running)
                    last_loss = running.item()
                    if not math.isfinite(last_loss):
                        raise GentoolError(f"loss is {last_loss} at step {done}", path=workdir,
                                           hint="lower --lr or check the data; the last good checkpoint is kept")
                    dt = time.time() - t0
                    tps = tokens_per_step * (done - start) / max(dt, 1e-9)
                    line = {"step": done, "tokens": done * tokens_per_step, "flops": done * flops_per_step,
                            "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(float(norm), 6),
                            "tokens_per_s": round(tps, 1), "seconds": round(time.time() - wall0, 3)}
                    if peak:
                        line["mfu"] = round(flops_per_step * (done - start) / max(dt, 1e-9) / peak, 4)
                    if is_eval:
                        evals = task.evaluate(ema if ema is not None else model)
                        line.update({k: round(v, 6) for k, v in evals.items()})
                    if rank == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(line) + "\n")
                    bar.update(completed=done, loss=last_loss, tok_s=round(tps))
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    save(done)
    except KeyboardInterrupt:
        save(step)
        raise GentoolError(f"interrupted at step {step}; state saved", path=workdir,
                           hint="continue with --resume", exit_code=130) from None
    save(cfg.steps)
    dt = time.time() - t0
    steps_run = max(1, cfg.steps - start)
    tps = tokens_per_step * steps_run / max(dt, 1e-9)
    mfu = flops_per_step * steps_run / max(dt, 1e-9) / peak if peak else None
    return TrainResult(cfg.steps, cfg.steps * tokens_per_step, cfg.steps * flops_per_step, last_loss, evals,
                       time.time() - wall0, tps, mfu)
