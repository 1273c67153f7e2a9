import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gentool.artifacts.tensorfiles import load_tensors, read_header
from gentool.errors import GentoolError


def raw(path, header: bytes | str, data: bytes = b""):
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    f = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.arange(4, dtype=torch.int32)}, str(f), metadata={"k": "v"})
    h = read_header(f)
    assert set(h) == {"a", "b"} and h["a"]["shape"] == [2, 3] and h["b"]["dtype"] == "I32"
    t = load_tensors(f, dtype=torch.bfloat16)
    assert t["a"].dtype == torch.bfloat16 and t["b"].dtype == torch.int32  # integers are never cast


@pytest.mark.parametrize("header, data, words", [
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     '"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, "tensor 'a' is named twice"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, "'a' and 'b' overlap"),
    ('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8, "lies outside the file"),
    ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"\0" * 8, "8 bytes for shape [3]"),
    ('{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}', b"\0", "malformed"),
    ('{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', b"", "malformed"),
    ('{"__metadata__": {"x": 1}}', b"", "__metadata__"),
    ("[1, 2]", b"", "not a JSON object"),
    ("{nope", b"", "not JSON"),
])
def test_bad_headers_are_refused_by_reason(tmp_path, header, data, words):
    with pytest.raises(GentoolError, match="not a valid safetensors file") as e:
        read_header(raw(tmp_path / "x.safetensors", header, data))
    assert words in str(e.value)


def test_truncated_files(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(b"\x05\0\0")
    with pytest.raises(GentoolError, match="shorter than the 8-byte"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(GentoolError, match="does not fit"):
        read_header(f)


def test_non_finite_weights_are_refused_by_name(tmp_path):
    f = tmp_path / "w.safetensors"
    w = torch.zeros(3, 3)
    w[1, 2] = float("nan")
    save_file({"ok": torch.ones(2), "model.layers.0.mlp.up_proj.weight": w}, str(f))
    with pytest.raises(GentoolError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight has NaN"):
        load_tensors(f)
    assert load_tensors(f, finite=False)["ok"].sum() == 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.dictionaries(st.text(max_size=4), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "U8", "BF16", "X"]), "shape": st.lists(st.integers(-1, 4), max_size=3),
    "data_offsets": st.lists(st.integers(-2, 40), min_size=2, max_size=2)}), max_size=3))
def test_never_anything_but_a_clear_error(tmp_path_factory, blob, entries):
    d = tmp_path_factory.mktemp("f")
    for f in (raw(d / "a.safetensors", json.dumps(entries), b"\0" * 32), d / "b.safetensors"):
        if f.name == "b.safetensors":
            f.write_bytes(blob)
        try:
            header = read_header(f)
        except GentoolError:
            continue
        assert all(isinstance(v["shape"], list) for v in header.values())


def test_cast_weight_refuses_only_what_the_narrow_dtype_cannot_hold():
    from gentool.artifacts.tensorfiles import cast_weight

    ok = torch.tensor([65504.0, -65504.0, 1e-9])  # float16's largest finite value; tiny values underflow, not inf
    assert torch.equal(cast_weight("w", ok, torch.float16).float()[:2], ok[:2])
    with pytest.raises(GentoolError, match=r"tensor w holds 65520, beyond float16's largest value \(65504\)"):
        cast_weight("w", torch.tensor([1.0, -65520.0]), torch.float16, "f.safetensors")  # rounds to -inf
    assert cast_weight("w", torch.tensor([1e6]), torch.bfloat16).item() == pytest.approx(1e6, rel=1e-2)
    assert cast_weight("w", torch.tensor([1e6]), torch.float32).item() == 1e6
    ids = torch.arange(3)
    assert cast_weight("ids", ids, torch.float16) is ids  # integers are never cast
    nan = torch.tensor([float("nan")])
    assert cast_weight("w", nan, torch.float16).isnan().all()  # not finite to begin with: check_finite's job


def test_load_tensors_refuses_a_float16_overflow_by_name(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"small": torch.ones(2), "big": torch.tensor([3.0, 1e5])}, str(f))
    with pytest.raises(GentoolError, match="tensor big holds 100000"):
        load_tensors(f, dtype=torch.float16)
    assert load_tensors(f, dtype=torch.bfloat16)["big"].dtype == torch.bfloat16
