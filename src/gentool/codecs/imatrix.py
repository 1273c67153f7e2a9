"""Importance matrices in llama.cpp's file formats: read and write the GGUF form, read the legacy .dat form.

Legend
    sums     name -> (nmat, ncols) float32: sum over calibration tokens of the squared input activation of each
             input column (nmat = experts, 1 for a dense weight); name is the weight's GGUF name
    counts   name -> (nmat,) int64: tokens that went into each row of sums
    values   name -> (nmat*ncols,) float32: sums/count, the per-column mean squared activation that llama-quantize
             passes to the quantizers (a row with count 0 reads as all ones, as there)

GGUF form (what llama-imatrix writes by default): no general.architecture; KVs `general.type` = "imatrix",
`imatrix.datasets` (string array), `imatrix.chunk_count` (u32), `imatrix.chunk_size` (u32); per weight, in sorted
name order, F32 tensors `<name>.in_sum2` with ne = [ncols, nmat] and `<name>.counts` with ne = [1, nmat].
Legacy .dat: i32 n_entries, then per entry i32 len, name, i32 ncall, i32 nval, nval f32 (mean * ncall); then
optionally i32 chunk count, i32 len and the dataset name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gentool.errors import GentoolError, UsageProblem

_ALIGN = 32
# GGUF value types: id -> struct format of a scalar
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _GGML_F32 = 8, 9, 0


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def values(self) -> dict[str, np.ndarray]:
        """Mean squared activation per input column, computed in float32 as llama-quantize's load_imatrix does."""
        out = {}
        for name, s in self.sums.items():
            c = np.asarray(self.counts[name], dtype=np.int64).reshape(-1)
            s = np.asarray(s, dtype=np.float32).reshape(len(c), -1)
            if self.legacy:  # sums hold mean*ncall: divide by ncall (0 keeps them)
                out[name] = (s / np.float32(c[0]) if c[0] > 0 else s).reshape(-1)
            else:
                cf = c.astype(np.float32)[:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[name] = np.where(cf > 0, s / cf, np.float32(1.0)).astype(np.float32).reshape(-1)
        return out


# --- GGUF ------------------------------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes, path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.data, self.pos)
        except struct.error:
            raise GentoolError("truncated GGUF file", path=self.path) from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise GentoolError("truncated GGUF file", path=self.path)
        s = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            return [self.value(itype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise GentoolError(f"unknown GGUF value type {vtype}", path=self.path)
        return self.take(_SCALAR[vtype])


def read_gguf_f32(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Metadata and F32 tensors of a small GGUF file (numpy shapes, i.e. ne reversed)."""
    data = Path(path).read_bytes()
    r = _Reader(data, path)
    if data[:4] != b"GGUF":
        raise UsageProblem("not a GGUF file", path=path)
    r.pos = 4
    version = r.take("<I")
    if version not in (2, 3):
        raise UsageProblem(f"unsupported GGUF version {version}", path=path)
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        ne = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append((name, ne, r.take("<I"), r.take("<Q")))
    align = int(meta.get("general.alignment", _ALIGN))
    start = -(-r.pos // align) * align
    tensors = {}
    for name, ne, gtype, offset in infos:
        if gtype != _GGML_F32:
            raise GentoolError(f"tensor {name} is not F32 (GGML type {gtype})", path=path,
                               hint="an imatrix stores F32 tensors only")
        n = int(np.prod(ne)) if ne else 1
        lo = start + offset
        if lo + 4 * n > len(data):
            raise GentoolError(f"tensor {name} runs past the end of the file", path=path)
        tensors[name] = np.frombuffer(data, "<f4", n, lo).reshape(tuple(reversed(ne)) or (1,)).copy()
    return meta, tensors


def _kv(key: str, vtype: int, value) -> bytes:
    out = struct.pack("<Q", len(key.encode())) + key.encode()
    if vtype == _ARRAY:  # of strings
        out += struct.pack("<IIQ", _ARRAY, _STRING, len(value))
        return out + b"".join(struct.pack("<Q", len(v.encode())) + v.encode() for v in value)
    if vtype == _STRING:
        return out + struct.pack("<I", _STRING) + struct.pack("<Q", len(value.encode())) + value.encode()
    return out + struct.pack("<I", vtype) + struct.pack(_SCALAR[vtype], value)


def write_imatrix(path: str | Path, sums: dict, counts: dict, *, datasets=(), chunk_count: int = 0,
                  chunk_size: int = 0) -> None:
    """Write the GGUF imatrix as llama-imatrix does (same keys, tensor order and layout). `sums[name]` is
    (ncols,) or (nmat, ncols) raw sums of squared activations; `counts[name]` an int or (nmat,) token counts."""
    entries = []
    for name in sorted(sums):
        s = np.asarray(sums[name], dtype=np.float32)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        c = np.broadcast_to(np.asarray(counts[name], dtype=np.float32).reshape(-1), (s.shape[0],))
        if s.ndim != 2 or not np.isfinite(s).all() or (s < 0).any():
            raise UsageProblem(f"imatrix entry {name}: sums must be finite, non-negative, (ncols,) or (nmat, ncols)")
        entries.append((name + ".in_sum2", s))
        entries.append((name + ".counts", np.ascontiguousarray(c).reshape(-1, 1)))
    head = [_kv("general.type", _STRING, "imatrix"), _kv("imatrix.datasets", _ARRAY, [str(d) for d in datasets]),
            _kv("imatrix.chunk_count", 4, int(chunk_count)), _kv("imatrix.chunk_size", 4, int(chunk_size))]
    infos, blobs, offset = [], [], 0
    for name, arr in entries:
        ne = list(reversed(arr.shape))
        while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims drops trailing 1s
            ne.pop()
        infos.append(struct.pack("<Q", len(name.encode())) + name.encode() + struct.pack("<I", len(ne))
                     + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", _GGML_F32, offset))
        blob = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        blob += b"\0" * (-len(blob) % _ALIGN)
        blobs.append(blob)
        offset += len(blob)
    out = b"GGUF" + struct.pack("<IQQ", 3, len(entries), len(head)) + b"".join(head) + b"".join(infos)
    out += b"\0" * (-len(out) % _ALIGN)
    Path(path).write_bytes(out + b"".join(blobs))


def _read_legacy(data: bytes, path) -> Imatrix:
    r = _Reader(data, path)
    n = r.take("<i")
    if n < 1:
        raise GentoolError("no entries in legacy imatrix file", path=path)
    sums, counts = {}, {}
    for _ in range(n):
        length = r.take("<i")
        if length < 0 or r.pos + length > len(data):
            raise GentoolError("not an imatrix file (bad entry name)", path=path)
        name = data[r.pos:r.pos + length].decode("utf-8", errors="replace")
        r.pos += length
        ncall, nval = r.take("<i"), r.take("<i")
        if nval < 1 or r.pos + 4 * nval > len(data):
            raise GentoolError(f"not an imatrix file (bad size for {name})", path=path)
        sums[name] = np.frombuffer(data, "<f4", nval, r.pos).copy()
        counts[name] = np.array([ncall], np.int64)
        r.pos += 4 * nval
    out = Imatrix(sums, counts, legacy=True)
    if r.pos + 4 <= len(data):
        out.chunk_count = r.take("<i")
        if r.pos + 4 <= len(data):
            length = r.take("<i")
            if length > 0:
                out.datasets.append(data[r.pos:r.pos + length].decode("utf-8", errors="replace"))
    return out


def read_imatrix(path: str | Path) -> Imatrix:
    """Read an imatrix in either form (GGUF tried first, as llama.cpp does)."""
    path = Path(path)
    if not path.is_file():
        raise UsageProblem("imatrix file not found", path=path)
    data = path.read_bytes()
    if data[:4] != b"GGUF":
        return _read_legacy(data, path)
    meta, tensors = read_gguf_f32(path)
    sums, counts = {}, {}
    for tname, arr in tensors.items():
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if tname.endswith(suffix):
                into[tname[:-len(suffix)]] = arr
    if not sums or set(sums) != set(counts):
        raise GentoolError("imatrix GGUF needs matching <name>.in_sum2 and <name>.counts tensors", path=path)
    for name, s in sums.items():
        c = counts[name].reshape(-1).astype(np.float64)
        counts[name] = (np.sign(c) * np.floor(np.abs(c) + 0.5)).astype(np.int64)  # std::lround
        sums[name] = s.reshape(len(c), -1)
    ds = meta.get("imatrix.datasets", [])
    return Imatrix(sums, counts, datasets=list(ds) if isinstance(ds, list) else [str(ds)],
                   chunk_count=int(meta.get("imatrix.chunk_count", 0)), chunk_size=int(meta.get("imatrix.chunk_size", 0)))


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """name -> per-column mean squared activation (float32), what llama-quantize --imatrix uses."""
    return read_imatrix(path).values()


def check_imatrix(values: dict[str, np.ndarray], shapes: dict[str, tuple], *, path=None) -> None:
    """Refuse an imatrix made for another model: an entry whose size differs from its weight's input columns."""
    for name, v in values.items():
        if name in shapes and v.size != shapes[name][-1]:
            raise UsageProblem(f"imatrix entry {name} has {v.size} values, the weight has {shapes[name][-1]} input "
                               "columns", path=path, hint="the importance matrix was computed for another model")
    if values and not set(values) & set(shapes):
        raise UsageProblem("no imatrix entry names a weight of this model", path=path,
                           hint="the importance matrix was computed for another model")
