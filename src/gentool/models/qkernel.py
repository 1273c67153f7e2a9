"""gentool's CPU kernel for packed-weight linear layers: built on first use, with a fallback.

`qmm(x, layout)` computes x·Wᵀ for a weight held as a `Layout` (unsigned codes, a zero code, a scale and an
optional offset per group, an optional 16-value table): every quantized format gentool writes maps onto one
(`layout()`, exactly: the layout's w = (c - zero)·scale + offset equals the format's dequantized weight up to float32
rounding). The C++ sources (models/qkernel_src.py, qkernel_int8_src.py, and decode_src.py: the whole-step
decoder) are compiled with g++ against the installed torch the first time a layer needs them (AVX-512, with VNNI
where the CPU has it, else AVX2 + FMA; OpenMP threads as torch's), cached under $GENTOOL_CACHE_DIR (default
~/.cache/gentool)/kernels keyed by the source, torch version and instruction set, and loaded with
torch.ops.load_library. Where the CPU lacks AVX2/FMA, no compiler is found or the build fails, `available()` is
False after one notice on stderr and the layers keep their previous path (dequantize + F.linear, or torch's
weight-only kernels).

Activations: on a CPU with AVX-512 VNNI, decoding multiplies the packed codes by activations rounded to 8 bits per
run of 4 values with integer dot products, as llama.cpp does with blocks of 32 (`act_bits()` = 8);
GENTOOL_CPU_KERNEL=exact keeps them float32 (the product is then x·dequant(W)ᵀ up to float32 rounding), as does a
CPU without VNNI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from gentool import console

MODE = os.environ.get("GENTOOL_CPU_KERNEL", "1")  # 0: never build or use it; exact: float32 activations
ENABLED = MODE != "0"
_state: dict = {}


ISAS = {"avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma"},
        "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}, "avx2": {"avx2", "fma"}}


def _isa() -> str | None:
    """The best instruction set the CPU has, at most $GENTOOL_CPU_ISA (tests build the others' code paths)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    except OSError:
        return None
    names = list(ISAS)
    cap = os.environ.get("GENTOOL_CPU_ISA")
    if cap in ISAS:
        names = names[names.index(cap):]
    return next((name for name in names if ISAS[name] <= set(flags)), None)


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
    from gentool.models import decode_src, qkernel_int8_src, qkernel_src

    source = qkernel_src.SOURCE + qkernel_int8_src.SOURCE + qkernel_src.TAIL + decode_src.SOURCE + qkernel_src.REGISTER
    flags = ["-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"] if isa.startswith("avx512") else []
    flags += ["-mavx512vnni"] if isa == "avx512vnni" else []
    key = hashlib.sha256(f"{source}{torch.__version__}{flags}".encode()).hexdigest()[:16]
    out = cache_dir() / f"gentool_qk_{isa}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    console.log(f"building gentool's CPU kernel for quantized layers ({isa}; once, cached in {out.parent})")
    src = out.with_suffix(f".{os.getpid()}.cpp")
    src.write_text(source)
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
    def _(x, codes, scale, offset, group, bits, lut, zero, act):
        return x.new_empty(x.shape[0], codes.shape[0])


def act_bits() -> int:
    """8 where decoding rounds activations to 8 bits (a CPU with AVX-512 VNNI, unless GENTOOL_CPU_KERNEL=exact),
    else 32. Call after `available()` said True."""
    if "act" not in _state:
        _state["act"] = 8 if MODE != "exact" and torch.ops.gentool_qk.has_vnni() else 32
    return _state["act"]


@contextmanager
def activation_bits(bits: int):
    """Decode with `bits` (8 or 32) activations inside the block, whatever the CPU's default (benchmarks compare
    the two); the previous setting afterwards."""
    if bits not in (8, 32):
        raise ValueError(f"activation bits must be 8 or 32, not {bits}")
    before = _state.get("act")
    _state["act"] = bits
    try:
        yield
    finally:
        if before is None:
            _state.pop("act", None)
        else:
            _state["act"] = before


@dataclass
class Layout:
    """w[n, k] = v(codes[n, k])·scale[n, k // group] + offset[n, k // group]; v(c) = c - zero, or lut[c] when a
    table is given."""
    codes: torch.Tensor                # bits 4: (N, K/2) uint8, nibbles paired 32 weights apart; bits 8: (N, K) uint8
    scale: torch.Tensor                # (N, K/group) float32
    offset: torch.Tensor | None        # (N, K/group) float32, or None for zero
    group: int
    bits: int
    lut: torch.Tensor | None = None    # (16,) float32
    zero: int = 0

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
           lut: torch.Tensor | None = None, zero: int = 0) -> Layout | None:
    """A Layout of w = (codes - zero)·scale + offset (or lut[codes]·scale) from integer codes (N, K) — 0..15 for
    bits 4; for bits 8 any integers with codes - zero in -128..127 — and per-group scale / offset (N, G); None
    where the kernel does not take the shape."""
    n, k = codes.shape
    scale = scale.reshape(n, -1)
    group = k // scale.shape[1] if scale.shape[1] and k % scale.shape[1] == 0 else 0
    if not fits(k, group, bits):
        return None
    if bits == 4:
        c = pack_nibbles(codes)
    else:  # unsigned bytes v + 128, the kernel's zero 128
        c, zero = (codes.to(torch.int16) - zero + 128).to(torch.uint8).contiguous(), 128
    off = None if offset is None or not bool(offset.any()) else offset.float().reshape(n, -1).contiguous()
    return Layout(c, scale.float().contiguous(), off, group, bits,
                  None if lut is None else lut.float().contiguous(), zero)


def usable(lay: Layout | None, x: torch.Tensor) -> bool:
    return lay is not None and x.device.type == "cpu" and lay.codes.device.type == "cpu" and available()


def qmm(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    """x (M, K) · Wᵀ -> (M, N) in x's dtype (computed in float32; decoding with `act_bits()` activations). Call
    after `available()` said True."""
    y = torch.ops.gentool_qk.qmm(x.float(), lay.codes, lay.scale, lay.offset, lay.group, lay.bits, lay.lut,
                                 lay.zero, act_bits())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def reset() -> None:
    """Forget the availability verdict (tests)."""
    _state.clear()


if __name__ == "__main__":  # python -m gentool.models.qkernel: build now and say whether it works
    print("available" if available() else "unavailable", file=sys.stderr)
