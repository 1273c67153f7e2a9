"""gentool's CPU kernel for packed-weight linear layers: built on first use, with a fallback.

`qmm(x, layout)` computes x·Wᵀ for a weight held as a `Layout` (codes, a scale and an optional offset per group,
an optional 16-value table): every quantized format gentool writes maps onto one (`layout_*` below, exactly: the
layout's w = v(c)·scale + offset equals the format's dequantized weight up to float32 rounding). The C++ source
(models/qkernel_src.py) is compiled with g++ against the installed torch the first time a layer needs it (AVX-512
when the CPU has it, else AVX2 + FMA), cached under $GENTOOL_CACHE_DIR (default ~/.cache/gentool)/kernels keyed by
the source, torch version and instruction set, and loaded with torch.ops.load_library. Where the CPU lacks AVX2/FMA,
no compiler is found or the build fails, `available()` is False after one notice on stderr and the layers keep
their previous path (dequantize + F.linear, or torch's weight-only kernels).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gentool import console

ENABLED = os.environ.get("GENTOOL_CPU_KERNEL", "1") != "0"  # GENTOOL_CPU_KERNEL=0: never build or use it
_state: dict = {}


def _isa() -> str | None:
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx2", "fma"} <= set(flags):
        return "avx512"
    if {"avx2", "fma"} <= set(flags):
        return "avx2"
    return None


def cache_dir() -> Path:
    """$GENTOOL_KERNEL_DIR, else $GENTOOL_CACHE_DIR/kernels (default ~/.cache/gentool/kernels)."""
    if os.environ.get("GENTOOL_KERNEL_DIR"):
        return Path(os.environ["GENTOOL_KERNEL_DIR"])
    return Path(os.environ.get("GENTOOL_CACHE_DIR") or Path.home() / ".cache" / "gentool") / "kernels"


def _torch_paths() -> tuple[list[Path], list[Path]]:
    """torch's C++ headers and libraries (what torch.utils.cpp_extension would give, without importing it: it
    needs setuptools, which a Python 3.12+ venv does not have)."""
    root = Path(torch.__file__).resolve().parent
    return [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"], [root / "lib"]


def _build(isa: str) -> Path:
    from gentool.models.qkernel_src import SOURCE

    flags = ["-mavx2", "-mfma", "-mf16c"] + (["-mavx512f", "-mavx512bw", "-mavx512vl"] if isa == "avx512" else [])
    key = hashlib.sha256(f"{SOURCE}{torch.__version__}{flags}".encode()).hexdigest()[:16]
    out = cache_dir() / f"gentool_qk_{isa}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    console.log(f"building gentool's CPU kernel for quantized layers ({isa}; once, cached in {out.parent})")
    src = out.with_suffix(f".{os.getpid()}.cpp")
    src.write_text(SOURCE)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-shared", "-fPIC", *flags, str(src), "-o", str(tmp),
           "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI))]
    includes, libraries = _torch_paths()
    cmd += [f"-I{p}" for p in includes]
    cmd += [f"-L{p}" for p in libraries] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    cmd += [f"-Wl,-rpath,{p}" for p in libraries]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["compiler failed"])[-1][:200])
        os.replace(tmp, out)  # whole file or nothing: a concurrent build writes its own temporary
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    if "ok" in _state:
        return _state["ok"]
    ok, why = False, ""
    isa = _isa()
    if not ENABLED:
        why = "GENTOOL_CPU_KERNEL=0"
    elif isa is None:
        why = "this CPU lacks AVX2/FMA"
    else:
        try:
            torch.ops.load_library(str(_build(isa)))
            _register_fake()
            ok = True
        except (OSError, RuntimeError, ImportError) as e:
            why = f"the build failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if not ok and ENABLED:
        console.log(f"note: gentool's CPU kernel for quantized layers is unavailable ({why}); "
                    "using the slower dequantize path")
    _state["ok"] = ok
    return ok


def _register_fake() -> None:
    @torch.library.register_fake("gentool_qk::qmm")
    def _(x, codes, scale, offset, group, bits, lut):
        return x.new_empty(x.shape[0], codes.shape[0])


@dataclass
class Layout:
    """w[n, k] = v(codes[n, k])·scale[n, k // group] + offset[n, k // group]; v(c) = lut[c] when a table is given."""
    codes: torch.Tensor                # bits 4: (N, K/2) uint8, nibbles paired 32 weights apart; bits 8: (N, K) int8
    scale: torch.Tensor                # (N, K/group) float32
    offset: torch.Tensor | None        # (N, K/group) float32, or None for zero
    group: int
    bits: int
    lut: torch.Tensor | None = None    # (16,) float32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset, self.lut)
                   if t is not None)


def fits(k: int, group: int, bits: int) -> bool:
    return group > 0 and k % group == 0 and group % (32 if bits == 4 else 16) == 0


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (N, K), K a multiple of 32 -> (N, K/2) uint8: per 32 weights, byte j = c[j] | c[j+16] << 4."""
    n, k = u.shape
    b = u.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def layout(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
           lut: torch.Tensor | None = None) -> Layout | None:
    """A Layout from codes (N, K) (0..15 for bits 4, -128..127 for bits 8) and per-group scale / offset (N, G);
    None where the kernel does not take the shape."""
    n, k = codes.shape
    scale = scale.reshape(n, -1)
    group = k // scale.shape[1] if scale.shape[1] and k % scale.shape[1] == 0 else 0
    if not fits(k, group, bits):
        return None
    c = pack_nibbles(codes) if bits == 4 else codes.to(torch.int8).contiguous()
    off = None if offset is None or not bool(offset.any()) else offset.float().reshape(n, -1).contiguous()
    return Layout(c, scale.float().contiguous(), off, group, bits,
                  None if lut is None else lut.float().contiguous())


def usable(lay: Layout | None, x: torch.Tensor) -> bool:
    return lay is not None and x.device.type == "cpu" and lay.codes.device.type == "cpu" and available()


def qmm(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    """x (M, K) · Wᵀ -> (M, N) in x's dtype (computed in float32). Call after `available()` said True."""
    y = torch.ops.gentool_qk.qmm(x.float(), lay.codes, lay.scale, lay.offset, lay.group, lay.bits, lay.lut)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def reset() -> None:
    """Forget the availability verdict (tests)."""
    _state.clear()


if __name__ == "__main__":  # python -m gentool.models.qkernel: build now and say whether it works
    print("available" if available() else "unavailable", file=sys.stderr)
