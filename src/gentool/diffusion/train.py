"""`train-diffusion`: DDPM or flow-matching denoisers on arrays, image folders or built-ins, through the shared
training loop (gentool.train) with an EMA copy of the weights (used for sampling). Reflow trains a flow model on
(noise, sample) pairs that a first flow model produced, initialised from it (Liu et al. 2022, 2-rectified flow)."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gentool import console
from gentool.artifacts import input_ref
from gentool.data.arrays import ArrayDataset, train_val
from gentool.diffusion import objectives
from gentool.diffusion.checkpoint import load_diffusion, save_diffusion
from gentool.diffusion.objectives import DiffusionSpec
from gentool.diffusion.samplers import flow_sample
from gentool.errors import UsageProblem
from gentool.models.denoisers import DenoiserConfig, build_denoiser
from gentool.train import TrainConfig, distributed, make_ema, train
from gentool.train.rundir import RunDir, RunOptions


@dataclass(kw_only=True)
class TrainDiffusionOptions(RunOptions):
    data: str
    family: str = "ddpm"
    parameterization: str | None = None       # default: eps (ddpm), velocity (flow-matching)
    schedule: str = "linear"
    timesteps: int = 1000
    model: str | None = None                  # mlp | unet (default: unet for images, mlp for vectors)
    width: int | None = None
    depth: int | None = None
    conditional: bool = True                  # use labels when the data has them
    class_dropout: float = 0.1
    image_size: int | None = None
    n_generated: int = 8192                   # size of generated toy datasets
    steps: int = 2000
    batch_size: int = 256
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.0
    ema_decay: float | None = None
    reflow_from: Path | None = None
    reflow_pairs: int | None = None
    reflow_steps: int = 50


def default_denoiser(kind: str | None, shape: list[int], width: int | None, depth: int | None,
                     num_classes: int) -> DenoiserConfig:
    kind = kind or ("unet" if len(shape) == 3 else "mlp")
    if kind == "mlp":
        return DenoiserConfig("mlp", shape, width=width or 128, depth=depth or 3, num_classes=num_classes)
    if len(shape) != 3:
        raise UsageProblem("--model unet needs image data", hint="use --model mlp for vectors")
    size = shape[1]
    mult = [1, 2] if size <= 16 else [1, 2, 2] if size <= 32 else [1, 2, 2, 2]
    return DenoiserConfig("unet", shape, width=width or (32 if size <= 16 else 64), depth=depth or (1 if size <= 16
                          else 2), channel_mult=mult, attn_max_res=max(4, size // 4), num_classes=num_classes)


def forward_flops(model: torch.nn.Module, shape: list[int], num_classes: int) -> float:
    """FLOPs of one forward pass on one example (torch's flop counter on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).cpu()
    y = torch.zeros(1, dtype=torch.long) if num_classes else None
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        probe(torch.zeros(1, *shape), torch.zeros(1), y)
    return float(fc.get_total_flops())


class DiffusionTask:
    """Random minibatches (a pure function of seed, step, micro, rank) and the objective of `spec`."""

    def __init__(self, train: ArrayDataset, val: ArrayDataset, spec: DiffusionSpec, *, batch_size: int, seed: int,
                 world: int, device: str, flops_per_example: float, noise: torch.Tensor | None = None):
        self.x, self.y = train.x.to(device), None if train.y is None or not spec.num_classes else train.y.to(device)
        self.noise = None if noise is None else noise.to(device)
        self.val_x = val.x[:1024].to(device)
        self.val_y = None if self.y is None or val.y is None else val.y[:1024].to(device)
        self.spec, self.schedule = spec, spec.schedule_obj() if spec.family == "ddpm" else None
        self.batch_size, self.seed, self.world, self.device = batch_size, seed, world, device
        self.tokens_per_micro = batch_size
        self.flops_per_micro = 3 * flops_per_example * batch_size

    def batch(self, step: int, micro: int, rank: int) -> tuple:
        rng = np.random.default_rng([self.seed, step, micro * self.world + rank])
        idx = torch.from_numpy(rng.integers(0, self.x.shape[0], size=self.batch_size)).to(self.device)
        return (self.x[idx], None if self.y is None else self.y[idx],
                None if self.noise is None else self.noise[idx])

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y, noise = batch
        return objectives.loss(model, x, y, self.spec, self.schedule, noise)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The objective on held-out data with fixed timesteps and noise (comparable across evaluations)."""
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(12345)
        x, n = self.val_x, self.val_x.shape[0]
        eps = torch.randn(x.shape, generator=g).to(self.device)
        spec = replace(self.spec, class_dropout=0.0)
        if spec.family == "ddpm":
            i = torch.randint(0, spec.timesteps, (n,), generator=g).to(self.device)
            val = objectives.ddpm_loss(model, x, self.val_y, spec, self.schedule, i=i, eps=eps)
        else:
            t = torch.rand(n, generator=g).to(self.device)
            val = objectives.flow_loss(model, x, self.val_y, spec, x0=eps, t=t)
        model.train(was)
        return {"val_loss": float(val)}


def _normalise(train: ArrayDataset, val: ArrayDataset, stats: dict | None) -> dict | None:
    """Standardise vectors per dimension (images are already in [-1, 1]); returns the statistics used."""
    if train.kind != "vector":
        return None
    if stats is None:
        mean, std = train.x.mean(0), train.x.std(0).clamp_min(1e-6)
        stats = {"mean": mean.tolist(), "std": std.tolist()}
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    train.x, val.x = (train.x - mean) / std, (val.x - mean) / std
    return stats


def run_train_diffusion(opts: TrainDiffusionOptions) -> dict[str, Any]:
    device = distributed.init_from_env(opts.device)
    rank, world = distributed.rank(), distributed.world_size()
    run = RunDir(opts.out, resume=opts.resume, force=opts.force)
    run.check(sources=[opts.data, opts.reflow_from])
    if opts.steps < 1 or opts.batch_size < 1:
        raise UsageProblem("--steps and --batch-size must be at least 1")
    teacher = load_diffusion(opts.reflow_from, device=device) if opts.reflow_from else None
    if teacher is not None and teacher.spec.family != "flow-matching":
        raise UsageProblem("--reflow-from needs a flow-matching checkpoint", path=opts.reflow_from)
    train_ds, val_ds = train_val(opts.data, image_size=opts.image_size, n=opts.n_generated, seed=opts.seed)
    norm = _normalise(train_ds, val_ds, teacher.data.get("normalization") if teacher else None)
    family = "flow-matching" if teacher else opts.family
    param = opts.parameterization or ("velocity" if family == "flow-matching" else "eps")
    classes = train_ds.classes if opts.conditional and train_ds.y is not None else None
    try:
        spec = DiffusionSpec(family, param, opts.schedule, opts.timesteps, len(classes) if classes else 0,
                             opts.class_dropout if classes else 0.0)
        denoiser = teacher.denoiser if teacher else default_denoiser(opts.model, train_ds.shape, opts.width,
                                                                     opts.depth, spec.num_classes)
        build_denoiser(denoiser)  # validates the shape before any work
    except ValueError as e:
        raise UsageProblem(str(e)) from None
    if teacher is not None:
        if teacher.denoiser.data_shape != train_ds.shape or teacher.spec.num_classes != spec.num_classes:
            raise UsageProblem("the data does not match the --reflow-from checkpoint's shape or classes",
                               path=opts.data)
    lr = opts.lr if opts.lr is not None else 2e-3 if denoiser.kind == "mlp" else 3e-4
    ema_decay = opts.ema_decay if opts.ema_decay is not None else min(0.999, max(0.9, 1 - 10 / opts.steps))
    tcfg = TrainConfig(steps=opts.steps, lr=lr, warmup=opts.warmup if opts.warmup is not None else
                       min(100, opts.steps // 10), weight_decay=opts.weight_decay, betas=(0.9, 0.999),
                       eval_every=opts.eval_every or max(1, opts.steps // 5), save_every=opts.save_every,
                       save_minutes=opts.save_minutes,
                       seed=opts.seed, device=device, amp_dtype=opts.dtype, compile=opts.compile,
                       log_every=max(1, min(50, opts.steps // 20)), ema_decay=ema_decay,
                       log_to=tuple(opts.log_to))
    # a path absolute, not as typed: the same run from another directory is the same recipe, and `sample` finds the
    # held-out data from anywhere (a built-in stays its name)
    where = os.path.abspath(opts.data) if Path(opts.data).exists() else str(opts.data)
    data_src = {"spec": where, "image_size": opts.image_size, "n": opts.n_generated, "seed": opts.seed,
                "val_fraction": 0.1}
    recipe = {"family": family, "parameterization": param,
              "schedule": spec.schedule_obj().to_dict() if family == "ddpm" else None,
              "path": "cond-ot" if family == "flow-matching" else None, "ema_decay": ema_decay,
              "model": denoiser.to_dict(), "train": tcfg.recipe(), "batch_size": opts.batch_size,
              "class_dropout": spec.class_dropout, "data": data_src,
              "reflow": None if teacher is None else {"teacher": teacher.manifest.id, "pairs": opts.reflow_pairs
                                                      or len(train_ds), "ode_steps": opts.reflow_steps}}
    run.begin(recipe)
    noise = None
    if teacher is not None:
        train_ds, noise = _reflow_data(teacher, train_ds, opts, run.partial)
    torch.manual_seed(opts.seed)
    model = build_denoiser(denoiser)
    if teacher is not None:  # 2-rectified flow starts from the 1-rectified one
        model.load_state_dict(teacher.model.state_dict())
    model.to(device).train()
    ema = make_ema(model)
    n_params = sum(p.numel() for p in model.parameters())
    task = DiffusionTask(train_ds, val_ds, spec, batch_size=opts.batch_size, seed=opts.seed, world=world,
                         device=device, flops_per_example=forward_flops(model, train_ds.shape, spec.num_classes),
                         noise=noise)
    console.log(f"{family} ({param}) {denoiser.kind}: {n_params:,} parameters; {len(train_ds):,} training examples "
                f"{train_ds.shape}; {opts.steps} steps of {opts.batch_size}")
    t0 = time.time()
    result = train(model, task, tcfg, run.partial, resume=opts.resume, ema=ema)
    summary = {"output": str(opts.out), "family": family, "parameterization": param, "steps": result.step,
               "samples_seen": result.tokens, "train_loss": result.train_loss, **result.eval,
               "samples_per_s": round(result.tokens_per_s, 1), "n_params": n_params}
    if rank != 0:
        return summary
    data_facts = {"kind": train_ds.kind, "levels": train_ds.levels, "classes": classes, "normalization": norm,
                  "source": data_src}
    inputs = [train_ds.source or {"role": "data", "path": str(opts.data)}]
    if teacher is not None:
        inputs.append(input_ref("teacher", teacher.manifest))
    with run.finish("diffusion-checkpoint", config=recipe, inputs=inputs) as art:
        save_diffusion(art.dir, model, ema, spec, denoiser, data_facts)
        art.contents.update(data_shape=train_ds.shape, n_params=n_params, step=result.step,
                            samples_seen=result.tokens, classes=classes, data_kind=train_ds.kind,
                            levels=train_ds.levels, normalization=norm, train_flops=result.flops)
        art.metrics.update({k: v for k, v in summary.items() if k not in ("output", "family", "parameterization")},
                           wall_seconds=round(time.time() - t0, 3))
    return summary


def _reflow_data(teacher, train_ds: ArrayDataset, opts: TrainDiffusionOptions,
                 partial: Path) -> tuple[ArrayDataset, torch.Tensor]:
    """(noise, teacher sample) pairs, generated once and kept in OUT.partial/ so a resumed run reuses them."""
    from safetensors.torch import load_file, save_file

    cache = partial / "reflow_pairs.safetensors"
    if cache.is_file():
        d = load_file(str(cache))
    else:
        n = opts.reflow_pairs or len(train_ds)
        g = torch.Generator().manual_seed(opts.seed + 77)
        noise = torch.randn(n, *train_ds.shape, generator=g)
        y = None
        if teacher.spec.num_classes:
            y = train_ds.y[torch.randint(0, len(train_ds), (n,), generator=g)]
        dev = next(teacher.model.parameters()).device
        xs = []
        with console.progress("reflow pairs", n) as bar, torch.no_grad():
            for k in range(0, n, 1024):
                yk = None if y is None else y[k:k + 1024].to(dev)
                xs.append(flow_sample(teacher.model, noise[k:k + 1024].to(dev), yk, method="heun",
                                      steps=opts.reflow_steps, num_classes=teacher.spec.num_classes).cpu())
                bar.update(advance=len(xs[-1]))
        d = {"noise": noise, "x": torch.cat(xs)}
        if y is not None:
            d["y"] = y
        from gentool.artifacts import atomic_file

        with atomic_file(cache) as tmp:  # a run killed here must not resume from half a cache
            save_file(d, str(tmp))
    pairs = ArrayDataset(d["x"], d.get("y"), train_ds.classes, train_ds.kind, train_ds.levels, train_ds.name,
                         train_ds.source)
    return pairs, d["noise"]
