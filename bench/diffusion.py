"""Quality versus sampling steps for DDPM / DDIM / DPM-Solver++ / flow matching / reflow, and U-Net training
throughput.

CPU (`--device cpu`): 2-D 8 Gaussians, MLP denoisers; scores are sliced Wasserstein-2 (SW) and MMD against a fresh
held-out draw, with the matched Gaussian (the prior mapped to data units) and a second data draw as the bounds.
GPU (`--device cuda`): the same table on the bundled 8x8 digits with U-Nets (pixel and classifier-feature scores),
plus training images/s of a 32x32 U-Net (bf16 autocast, AdamW) against the bf16 matmul peak.

    python bench/diffusion.py --device cpu     # ~5 min on 2 idle cores
    python bench/diffusion.py --device cuda
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from _common import device_name, matmul_peak, parser, sync, table

from gentool.data.arrays import to_uint8, toy_2d, train_val
from gentool.diffusion.checkpoint import load_diffusion
from gentool.diffusion.sample import generate
from gentool.diffusion.metrics import score_samples
from gentool.diffusion.train import TrainDiffusionOptions, run_train_diffusion

DDPM_ROWS = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("dpm++2m", 10),
             ("dpm++2m", 20), ("heun", 10)]
FLOW_ROWS = [(m, s) for m in ("euler", "heun") for s in (5, 10, 20, 50)]
REFLOW_ROWS = [("euler", 1), ("euler", 2), ("euler", 4)]


def train(work: Path, name: str, data: str, device: str, **kw) -> Path:
    out = work / name
    t0 = time.time()
    s = run_train_diffusion(TrainDiffusionOptions(data=data, out=out, device=device, force=True, **kw))
    print(f"trained {name}: {s['n_params']:,} params, {s['steps']} steps, val_loss {s.get('val_loss', 0):.4f}, "
          f"{time.time() - t0:.0f}s", flush=True)
    return out


def quality_table(work: Path, data: str, device: str, n: int, steps: int, batch: int, **model_kw) -> list[dict]:
    ddpm = train(work, "ddpm", data, device, steps=steps, batch_size=batch, **model_kw)
    flow = train(work, "flow", data, device, family="flow-matching", steps=steps, batch_size=batch, **model_kw)
    reflow = train(work, "reflow", data, device, reflow_from=flow, steps=steps // 2, batch_size=batch,
                   reflow_pairs=8192 if data != "builtin:digits" else 10000)
    image = data == "builtin:digits"
    if image:
        _, held = train_val(data)
        ref, ref2 = held.x, None
    else:
        ref = torch.from_numpy(toy_2d(data.removeprefix("builtin:"), n, 424242))
        ref2 = torch.from_numpy(toy_2d(data.removeprefix("builtin:"), n, 434343))
    rows = []

    def add(model, sampler, steps_, nfe, x):
        s = score_samples(x, ref)
        row = {"model": model, "sampler": sampler, "steps": steps_, "NFE": nfe, "SW": s["sw"], "MMD": s["mmd"]}
        if image:
            row.update(SW_feat=s["sw_features"], MMD_feat=s["mmd_features"])
        rows.append(row)

    gauss = torch.randn(n, *ref.shape[1:]) * ref.std(0) + ref.mean(0)
    add("matched Gaussian", "-", "-", 0, gauss.clamp(-1, 1) if image else gauss)
    if ref2 is not None:
        add("data (2nd draw)", "-", "-", 0, ref2)
    for path, label, grid in ((ddpm, "DDPM eps", DDPM_ROWS), (flow, "flow matching", FLOW_ROWS),
                              (reflow, "reflow (2-RF)", REFLOW_ROWS)):
        ckpt = load_diffusion(path, device=device)
        for sampler, k in grid:
            x, nfe = generate(ckpt, num_samples=n, sampler=sampler, steps=k, device=device, seed=1,
                              y=None if not ckpt.spec.num_classes else torch.arange(n) % ckpt.spec.num_classes)
            x = to_uint8(x).float() / 127.5 - 1 if image else ckpt.denormalize(x)
            add(label, sampler, k, nfe, x)
    base = next(r["SW"] for r in rows if r["sampler"] == "ddpm")
    for r in rows:
        r["SW / DDPM-1000"] = r["SW"] / base
    return rows


def unet_throughput(device: str, batch: int = 256, steps: int = 30) -> dict:
    from gentool.diffusion.objectives import DiffusionSpec, ddpm_loss
    from gentool.diffusion.train import default_denoiser, forward_flops
    from gentool.models.denoisers import build_denoiser
    from gentool.train.optim import build_optimizer

    cfg = default_denoiser("unet", [3, 32, 32], None, None, 0)
    model = build_denoiser(cfg).to(device)
    flops = 3 * forward_flops(model, [3, 32, 32], 0)
    spec = DiffusionSpec("ddpm", "eps", "cosine", 1000)
    sch = spec.schedule_obj()
    opt = build_optimizer(model, lr=2e-4, weight_decay=0.0, device=device)
    x = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    amp = device.startswith("cuda")

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            loss = ddpm_loss(model, x, None, spec, sch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    ips = batch * steps / (time.perf_counter() - t0)
    peak = matmul_peak(device)
    return {"model": f"U-Net 32x32 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)",
            "batch": batch, "images/s": ips, "GFLOP/image (train)": flops / 1e9,
            "achieved / matmul peak": ips * flops / peak}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--samples", type=int, default=None, help="samples scored per row (default 3000 CPU, 2000 GPU)")
    args = p.parse_args()
    dev = args.device
    print(f"device: {device_name(dev)}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if dev == "cpu":
            rows = quality_table(Path(tmp), "builtin:8gaussians", dev, n=args.samples or 3000, steps=args.steps or 1500, batch=256,
                                 timesteps=1000, width=64, depth=2, lr=3e-3)
            table("8 Gaussians (2-D), quality vs sampling steps (SW, MMD vs held-out; lower is better)", rows)
        else:
            rows = quality_table(Path(tmp), "builtin:digits", dev, n=args.samples or 2000, steps=args.steps or 6000, batch=256,
                                 timesteps=1000, schedule="cosine")
            table("8x8 digits, quality vs sampling steps (pixels and classifier features)", rows)
            table("U-Net training throughput", [unet_throughput(dev)])


if __name__ == "__main__":
    main()
