"""The training loop: AdamW or Muon (train/optim.py), schedule, accumulation, bf16 autocast on CUDA, clipping, eval,
JSON-lines metrics, atomic checkpoints with exact resume, Ctrl-C safety and a NaN stop, DDP or FSDP2 under torchrun.

A Task supplies the data and the loss; batches are a pure function of (seed, step, micro-step, rank), so a resumed
run sees exactly the batches the uninterrupted one would have, and P processes with accumulation A see the same
global batch as one process with accumulation P·A.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from gentool import console
from gentool.artifacts.store import INVOCATION
from gentool.errors import GentoolError, Terminated, UsageProblem
from gentool.train import distributed
from gentool.train.checkpoint import latest_state, load_state, read_state_meta, save_state
from gentool.train.ema import ema_update
from gentool.train.metrics import MetricsLog
from gentool.train.optim import EMBED_LR, HEAD_LR, build_optimizer, device_peak_flops
from gentool.train.schedules import lr_at
from gentool.train.trackers import Trackers, check_backends


class Task(Protocol):
    """What a model family plugs into the loop. Optional: `compile_loss = True` (compile loss() with the model
    inside, so e.g. the cross-entropy fuses), `state_dict()` / `load_state_dict()` for a data cursor beyond the
    step (batches that are a pure function of the step need none)."""

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
    save_minutes: float = 10.0      # also save when this much wall-clock time passed since the last save (0: never)
    keep: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    amp_dtype: str | None = None    # "bfloat16" on CUDA by default, none (float32) on CPU
    compile: bool = False
    ema_decay: float | None = None
    optimizer: str = "adamw"        # adamw, muon or normuon (train/optim.py)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    embed_lr: float | None = None   # muon: AdamW's rate on the embeddings / an untied head (None: optim.py's)
    head_lr: float | None = None
    parallel: str = "ddp"           # under torchrun: ddp (replicas) or fsdp (sharded weights, gradients, state)
    cooldown: float = 0.2           # wsd: the fraction of the steps over which the learning rate decays
    log_to: tuple[str, ...] = ()    # experiment trackers beside metrics.jsonl (train/trackers.py)

    def __post_init__(self) -> None:
        """Refuse what no trainer can run, before a run directory exists (a corrected rerun is not an unfinished
        run)."""
        autocast_dtype(self.amp_dtype, self.device)
        check_backends(self.log_to)
        for name, value, ok in (
                ("--steps", self.steps, self.steps >= 1), ("--lr", self.lr, 0 < self.lr < math.inf),
                ("--min-lr-ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1),
                ("--warmup", self.warmup, self.warmup >= 0),
                ("--weight-decay", self.weight_decay, self.weight_decay >= 0),
                ("--grad-clip", self.grad_clip, self.grad_clip >= 0),
                ("--eval-every", self.eval_every, self.eval_every >= 0),
                ("--save-every", self.save_every, self.save_every >= 0),
                ("--save-minutes", self.save_minutes, self.save_minutes >= 0), ("--keep", self.keep, self.keep >= 1),
                ("--muon-lr", self.muon_lr, self.muon_lr > 0),
                ("--muon-momentum", self.muon_momentum, 0 <= self.muon_momentum < 1),
                ("--embed-lr", self.embed_lr, self.embed_lr is None or self.embed_lr > 0),
                ("--head-lr", self.head_lr, self.head_lr is None or self.head_lr > 0),
                ("--cooldown", self.cooldown, 0 < self.cooldown <= 1)):
            if not ok:
                raise UsageProblem(f"{name} {value} is out of range")
        if self.optimizer != "adamw":  # the defaults resolved, so the recipe records the rates a run used
            self.embed_lr = EMBED_LR if self.embed_lr is None else self.embed_lr
            self.head_lr = HEAD_LR if self.head_lr is None else self.head_lr

    def recipe(self) -> dict[str, Any]:
        """What changes results (device, compile, logging cadence and the parallel layout do not). Options added
        later are left out at their defaults, so a run started before they existed still resumes."""
        d = asdict(self)
        for k in ("device", "compile", "log_every", "save_every", "save_minutes", "keep", "parallel", "log_to"):
            d.pop(k)
        if self.optimizer == "adamw":
            for k in ("optimizer", "muon_lr", "muon_momentum", "embed_lr", "head_lr"):
                d.pop(k)
        if self.cooldown == 0.2:
            d.pop("cooldown")
        return d


@dataclass
class TrainResult:
    step: int
    tokens: int
    flops: float
    train_loss: float
    eval: dict[str, float]
    seconds: float
    tokens_per_s: float          # steady state: the logged windows after the first (which includes compilation)
    mfu: float | None


def autocast_dtype(amp_dtype: str | None, device: str) -> torch.dtype | None:
    if amp_dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else None
    name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(amp_dtype, amp_dtype)
    if name == "float32":
        return None
    if name == "float16":
        raise UsageProblem("float16 training needs loss scaling, which gentool does not do", hint="use --dtype "
                           "bfloat16")
    if name != "bfloat16":
        raise UsageProblem(f"unknown --dtype {amp_dtype!r}", hint="use bfloat16 or float32")
    return torch.bfloat16


@contextmanager
def _deferred_interrupt() -> Iterator[dict[str, Any]]:
    """The first Ctrl-C or SIGTERM (what schedulers, `timeout` and container stops send) sets a flag that the loop
    checks between steps, so no step is left half-applied and the state is saved; a second one interrupts at once."""
    flag: dict[str, Any] = {"stop": False, "signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt
        flag["stop"], flag["signal"] = True, signum
        console.warn("stopping after this step to save the state (Ctrl-C again to abort without saving)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _agree(flags: list[bool], world: int, *, logged: bool, device: str) -> list[bool]:
    """Per-rank decisions (stop, save now) every rank must share: under DDP they are combined (max over ranks) at
    log steps only, which keeps the per-step path free of collectives and host syncs."""
    if world == 1:
        return flags
    if not logged:
        return [False] * len(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    distributed.all_reduce_max(t)
    return [bool(v) for v in t.tolist()]


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, workdir: Path, *, resume: bool = False,
          on_checkpoint: Callable[[int], None] | None = None, ema: torch.nn.Module | None = None) -> TrainResult:
    """Train in workdir (metrics.jsonl, state/step-N). Returns the final figures; raises GentoolError on a
    non-finite loss (exit 1, naming the step) or on Ctrl-C (exit 130) after saving the state."""
    rank, world = distributed.rank(), distributed.world_size()
    device = cfg.device
    amp = autocast_dtype(cfg.amp_dtype, device)
    model.to(device)
    sharded = cfg.parallel == "fsdp" and distributed.initialized()
    if sharded and ema is not None:
        raise UsageProblem("an EMA of the weights is not kept under --parallel fsdp", hint="use --parallel ddp")
    if sharded:  # FSDP2 replaces the parameters by DTensor shards: the optimizer is built on those
        distributed.shard(model, device, amp=autocast_dtype(cfg.amp_dtype, device))
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, device=device,
                          optimizer=cfg.optimizer, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
                          embed_lr=cfg.embed_lr, head_lr=cfg.head_lr)
    state_dir = workdir / "state"
    if rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume and (last := latest_state(state_dir)) is not None:
        if not _same(read_state_meta(last).get("recipe"), cfg.recipe()):
            raise UsageProblem("the saved training state was made with a different configuration", path=last,
                               hint="repeat the original options, or start over with --force")
        meta = load_state(last, model=model, optimizer=opt, ema=ema)
        start = meta["step"]
        if hasattr(task, "load_state_dict") and meta.get("cursor") is not None:
            task.load_state_dict(meta["cursor"])
        console.log(f"resuming from {last} (step {start})")
    tokens_per_step = task.tokens_per_micro * cfg.grad_accum * world
    flops_per_step = task.flops_per_micro * cfg.grad_accum * world
    metrics = MetricsLog(workdir / "metrics.jsonl", tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
                         peak_flops=device_peak_flops(device), start_step=start, resume=resume, write=rank == 0)
    train_model = model if sharded else distributed.wrap(model, device)
    compile_loss = cfg.compile and world == 1 and getattr(task, "compile_loss", False)  # DDP: compile the wrapper
    forward = torch.compile(train_model) if cfg.compile and not compile_loss else train_model
    loss_fn = torch.compile(task.loss) if compile_loss else task.loss
    dev_type = torch.device(device).type
    inf = torch.tensor(math.inf, device=device)
    first_bad = inf.clone()                       # first step whose loss or gradient norm was not finite
    last_saved = start if start else None
    last_loss, evals, windows = math.nan, {}, []
    done, total, norm = start, None, None
    last_save_time = time.time()

    def check() -> None:
        """Raise if any step so far had a non-finite loss or gradient (one host sync: at log and save points)."""
        if world > 1:
            distributed.all_reduce_min(first_bad)
        bad = first_bad.item()
        if math.isfinite(bad):
            kept = f"the last good state (step {last_saved}) is kept in {state_dir}" if last_saved is not None \
                else "no state had been saved yet"
            raise GentoolError(f"loss is {total.item():g} at step {int(bad)}, not finite; training stopped",
                               path=workdir, hint=f"lower --lr or check the data; {kept}")

    def save(step_done: int) -> None:
        nonlocal last_saved
        check()
        last_saved = step_done
        if rank == 0 or sharded:  # FSDP2: the shards are gathered on every rank, rank 0 writes
            t = time.perf_counter()
            cursor = task.state_dict() if hasattr(task, "state_dict") else {"step": step_done}
            save_state(state_dir, model=model, optimizer=opt, step=step_done, keep=cfg.keep, ema=ema,
                       write=rank == 0,
                       extra={"recipe": cfg.recipe(), "cursor": cursor,
                              "lr": lr_at(max(0, step_done - 1), total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                                          schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio,
                                          decay_fraction=cfg.cooldown)})
            if on_checkpoint and rank == 0:
                on_checkpoint(step_done)
            metrics.exclude(time.perf_counter() - t)
        distributed.barrier()  # every rank calls save(): none goes on (or resumes) before rank 0 has written

    trackers = Trackers(cfg.log_to if rank == 0 else (), workdir,
                        {**(INVOCATION.get() or {}), "train": cfg.recipe()})
    with _deferred_interrupt() as interrupt, console.progress("training", cfg.steps) as bar, \
            closing(trackers):
        bar.update(completed=start)
        try:
            for step in range(start, cfg.steps):
                lr = lr_at(step, total=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule,
                           min_ratio=cfg.min_lr_ratio, decay_fraction=cfg.cooldown)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                total = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = task.batch(step, micro, rank)
                    with distributed.no_sync(train_model, last=micro == cfg.grad_accum - 1), \
                            torch.autocast(device_type=dev_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        loss = loss_fn(forward, batch) / cfg.grad_accum
                    loss.backward()
                    total += loss.detach()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                if hasattr(norm, "full_tensor"):  # FSDP2: the norm of DTensor gradients
                    norm = norm.full_tensor()
                finite = torch.isfinite(total) & torch.isfinite(norm)
                first_bad = torch.minimum(first_bad, torch.where(finite, inf, float(step + 1)))
                if dev_type == "cpu":  # free on CPU: stop before the bad update touches the weights
                    check()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema_update(ema, model, cfg.ema_decay or 0.999)
                done = step + 1
                is_eval = bool(cfg.eval_every) and (done % cfg.eval_every == 0 or done == cfg.steps)
                is_log = done % cfg.log_every == 0 or done == cfg.steps or is_eval
                if is_log:
                    distributed.all_reduce_mean(total)
                    last_loss = total.item()
                    check()
                    steps_in_window, tps = done - metrics.mark_step, metrics.rate(done)[0]
                    windows.append((steps_in_window, steps_in_window * tokens_per_step / max(tps, 1e-9)))
                    if is_eval and (rank == 0 or sharded):  # FSDP2: every rank takes part in the forward
                        t = time.perf_counter()
                        evals = task.evaluate(ema if ema is not None else model)
                        metrics.exclude(time.perf_counter() - t)
                    extra = {**(task.log_metrics() if hasattr(task, "log_metrics") else {}),  # e.g. rewards/*
                             **(evals if is_eval else {})}
                    line = metrics.log(done, loss=last_loss, lr=lr, grad_norm=float(norm), extra=extra or None)
                    if trackers.live:
                        trackers.log(line)
                    eta = (cfg.steps - done) * tokens_per_step / max(line["tokens_per_s"], 1e-9)
                    bar.update(completed=done, loss=last_loss, tok_s=round(line["tokens_per_s"]),
                               eta=console.format_eta(eta))
                overdue = bool(cfg.save_minutes) and time.time() - last_save_time >= 60 * cfg.save_minutes
                stop, overdue = _agree([interrupt["stop"], overdue], world, logged=is_log, device=device)
                if stop:
                    save(done)
                    term = interrupt["signal"] == signal.SIGTERM
                    raise GentoolError(f"{'terminated' if term else 'interrupted'} at step {done}; state saved",
                                       path=workdir, hint="continue with --resume", exit_code=143 if term else 130)
                if done < cfg.steps and (overdue or (cfg.save_every and done % cfg.save_every == 0)):
                    save(done)
                    last_save_time = time.time()
        except KeyboardInterrupt as e:  # a second signal (or one outside the main thread): the step may be half done
            kept = f"step {last_saved}" if last_saved is not None else "none"
            term = isinstance(e, Terminated)
            raise GentoolError(f"{'terminated' if term else 'interrupted'} during step {done + 1}; not saved (last "
                               f"saved state: {kept})", path=workdir, hint="continue with --resume",
                               exit_code=143 if term else 130) from None
    save(cfg.steps)
    steady = windows[1:] or windows
    secs = sum(s for _, s in steady)
    tps = tokens_per_step * sum(n for n, _ in steady) / secs if secs > 0 else 0.0
    peak = metrics.peak
    return TrainResult(cfg.steps, cfg.steps * tokens_per_step, cfg.steps * flops_per_step, last_loss, evals,
                       time.time() - metrics.wall0, tps, tps * flops_per_step / tokens_per_step / peak if peak else None)
