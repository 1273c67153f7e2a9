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


def llc_bytes() -> int:
    """The last-level cache's size (sysfs), 32 MiB when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        t = f.read_text().strip()
        sizes.append(int(t[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[t[-1]] if t[-1] in "KMG" else int(t))
    return max(sizes, default=32 << 20)


def read_bandwidth(*, reps: int = 15, min_bytes: int = 512 << 20) -> dict[str, float]:
    """Bytes *read* per second from a buffer of max(512 MiB, 8 x the last-level cache) of float32, by a reduction
    (torch.sum: reads each byte once, writes nothing): the roofline of batch-1 decoding, which reads every weight
    once per token. Best and median of `reps` passes after two warm-ups; the best is the figure (a shared machine's
    load only ever slows a pass down), the median says how loaded it was."""
    n = max(min_bytes, 8 * llc_bytes()) // 4
    buf = torch.ones(n, dtype=torch.float32)
    for _ in range(2):
        buf.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"best": 4 * n / times[0], "median": 4 * n / times[len(times) // 2], "bytes": 4 * n}


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
