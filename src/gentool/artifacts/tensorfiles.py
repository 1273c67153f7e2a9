"""Reading safetensors files that may come from anywhere (a Hugging Face directory has no manifest to vouch for
them): the header is checked before a tensor is read, and floating-point weights must be finite.

The safetensors library accepts a header that names a tensor twice (its JSON parser keeps the last entry), so
the header is parsed here first with duplicates refused by name, offsets checked against the file, and then the
tensors are read with `safe_open` (memory-mapped, no pickle).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from gentool.errors import GentoolError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 << 20          # what the safetensors library itself allows
_HINT = "the file is truncated or corrupt; re-create or re-download it"


def _bad(path: Path, why: str) -> GentoolError:
    return GentoolError(f"not a valid safetensors file ({why})", path=path, hint=_HINT)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"tensor {key!r} is named twice in the header")
        seen[key] = value
    return seen


def read_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}, metadata left out), after
    checking everything that can be checked without reading the data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise GentoolError(f"cannot read ({e.strerror or e})", path=path) from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, str(e) if "named twice" in str(e) else f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data_bytes = size - 8 - n
    spans = []
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _bad(path, "__metadata__ must map strings to strings")
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = dtype in DTYPE_BYTES and isinstance(shape, list) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) and all(
                isinstance(o, int) and not isinstance(o, bool) for o in (start, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _bad(path, f"entry for tensor {name!r} is malformed")
        if not 0 <= start <= end <= data_bytes:
            raise _bad(path, f"tensor {name!r} lies outside the file (bytes {start}..{end} of {data_bytes})")
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise _bad(path, f"tensor {name!r}: {end - start} bytes for shape {shape} of {dtype}")
        spans.append((start, end, name))
        tensors[name] = info
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise _bad(path, f"tensors {a!r} and {b!r} overlap")
    return tensors


def check_finite(name: str, t: Any, where: str | Path | None) -> None:
    """Refuse NaN or infinite values in a floating-point tensor or numpy array (8-bit float codes are stored data,
    not weights)."""
    import numpy as np
    import torch

    if isinstance(t, np.ndarray):
        bad = t.dtype.kind == "f" and not np.isfinite(t).all()
    else:
        bad = t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and not torch.isfinite(t).all()
    if bad:
        raise GentoolError(f"tensor {name} has NaN or infinite values", path=where,
                           hint="the weights are broken; re-create or re-download them")


def cast_weight(name: str, t: Any, dtype: Any, where: str | Path | None = None, *,
                hint: str = "keep the weights in float32 or bfloat16 (--dtype bfloat16)") -> Any:
    """`t` cast to `dtype`, or one GentoolError naming the tensor and its largest |value| when a finite weight
    would not be finite any more (float16 holds at most 65504). Integer and 8-bit codes are returned as they are;
    every place that narrows weights (float16 above all) goes through here."""
    import torch

    if dtype is None or not t.is_floating_point() or t.dtype.itemsize == 1 or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if torch.finfo(dtype).max < torch.finfo(t.dtype).max and not torch.isfinite(out).all() \
            and torch.isfinite(t).all():
        big = float(t.abs().max())
        raise GentoolError(f"tensor {name} holds {big:.6g}, beyond {str(dtype).replace('torch.', '')}'s largest "
                           f"value ({torch.finfo(dtype).max:.6g})", path=where, hint=hint)
    return out


def load_tensors(path: str | Path, *, dtype: Any = None, device: Any = "cpu", finite: bool = True) -> dict[str, Any]:
    """Every tensor of a checked safetensors file, floating-point ones cast to `dtype` one at a time (no
    full-precision copy of a half-precision model), refused by name when not finite."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    read_header(path)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = handle.get_tensor(key)
                if finite:
                    check_finite(key, t, path)
                t = cast_weight(key, t, dtype, path)
                out[key] = t.to(device)
    except GentoolError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise GentoolError(f"cannot read safetensors ({e})", path=path, hint=_HINT) from None
    return out
