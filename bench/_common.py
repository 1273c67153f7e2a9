"""Shared helpers for bench/ scripts: timing, hardware ceilings, table printing."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, *, warmup: int = 2, reps: int = 5) -> float:
    """Seconds per call (mean of reps, after warmup)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def matmul_peak(device: str) -> float:
    """FLOP/s of a large bf16 (CUDA) or fp32 (CPU) matmul on random data."""
    n = 8192 if device.startswith("cuda") else 1024
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, warmup=3, reps=10)


def copy_bandwidth(device: str) -> float:
    """Bytes moved per second (read + written) by a large device copy: the bandwidth roofline (~2.95 TB/s, H100)."""
    from gentool.lm.sample import measure_copy_bandwidth

    return measure_copy_bandwidth(device)


def table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    cols = list(rows[0])
    fmt = [max(len(c), *(len(_f(r[c])) for r in rows)) for c in cols]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, fmt)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in fmt) + "|")
    for r in rows:
        print("| " + " | ".join(_f(r[c]).ljust(w) for c, w in zip(cols, fmt)) + " |")
    sys.stdout.flush()


def _f(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
