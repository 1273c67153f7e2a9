import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gentool.artifacts import (MANIFEST, canonical_json, create_artifact, parse_manifest, read_artifact,
                               sha256_file)
from gentool.errors import GentoolError, UsageProblem


def _make(tmp_path, name="art", kind="tokenizer", force=False, payload=b"hello"):
    out = tmp_path / name
    with create_artifact(out, kind, force=force, config={"vocab_size": 8}, command=["gentool", "x"]) as art:
        (art.dir / "data.bin").write_bytes(payload)
        (art.dir / "sub").mkdir()
        (art.dir / "sub" / "b.txt").write_text("b")
        art.contents["vocab_size"] = 8
        art.metrics["seconds"] = float("nan")
    return out, art.manifest


def test_create_and_read_roundtrip(tmp_path):
    out, m = _make(tmp_path)
    assert (out / MANIFEST).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"
    back = read_artifact(out, "tokenizer")
    assert back.id == m.id and back.fingerprint == m.fingerprint
    assert back.files["data.bin"] == {"sha256": sha256_file(out / "data.bin"), "bytes": 5}
    assert "sub/b.txt" in back.files
    assert back.metrics["seconds"] is None  # NaN becomes null in canonical JSON
    assert back.kind == "tokenizer" and back.format == "gentool.tokenizer"


def test_id_is_content_identity_and_fingerprint_is_recipe(tmp_path):
    _, a = _make(tmp_path, "a")
    _, b = _make(tmp_path, "b")
    _, c = _make(tmp_path, "c", payload=b"other")
    assert a.id == b.id != c.id
    assert a.fingerprint == c.fingerprint


def test_existing_output_refused_without_force(tmp_path):
    out, first = _make(tmp_path)
    with pytest.raises(UsageProblem, match="output exists"):
        _make(tmp_path)
    _, second = _make(tmp_path, force=True, payload=b"new")
    assert read_artifact(out).id == second.id != first.id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_exception_and_interrupt_leave_nothing(tmp_path):
    out = tmp_path / "art"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with create_artifact(out, "samples") as art:
                (art.dir / "half.bin").write_bytes(b"x" * 100)
                raise exc
        assert list(tmp_path.iterdir()) == []


def test_wrong_kind_missing_and_partial(tmp_path):
    out, _ = _make(tmp_path)
    with pytest.raises(UsageProblem, match="expected gentool.token-shards, found gentool.tokenizer"):
        read_artifact(out, "token-shards")
    with pytest.raises(UsageProblem, match="no such file"):
        read_artifact(tmp_path / "nope", "tokenizer")
    (tmp_path / "run.partial").mkdir()
    with pytest.raises(UsageProblem, match="incomplete run"):
        read_artifact(tmp_path / "run", "lm-checkpoint")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageProblem, match="not a gentool artifact"):
        read_artifact(tmp_path / "plain")


def test_corrupt_truncated_and_newer(tmp_path):
    out, _ = _make(tmp_path)
    (out / "data.bin").write_bytes(b"hellO")
    with pytest.raises(GentoolError, match="sha256 differs"):
        read_artifact(out)
    read_artifact(out, verify=False)  # --no-verify skips hashes ...
    (out / "data.bin").write_bytes(b"hel")
    with pytest.raises(GentoolError, match="truncated"):
        read_artifact(out, verify=False)  # ... but never sizes
    os.remove(out / "data.bin")
    with pytest.raises(GentoolError, match="missing file data.bin"):
        read_artifact(out)
    data = json.loads((out / MANIFEST).read_text())
    data["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(UsageProblem, match="upgrade gentool"):
        read_artifact(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(GentoolError, match="not valid JSON"):
        read_artifact(out)


def test_canonical_json_is_stable():
    a = canonical_json({"b": 1, "a": [1.0, float("inf")]})
    assert a == canonical_json({"a": [1.0, float("inf")], "b": 1})
    assert a.endswith("\n") and "null" in a


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _json.map(json.dumps),
                 st.dictionaries(st.sampled_from(["format", "format_version", "files", "inputs", "config", "id",
                                                  "command", "contents"]), _json, max_size=8).map(json.dumps)))
def test_fuzz_manifest_parser_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("m")
    try:
        m = parse_manifest(text, path)
    except GentoolError as e:  # UsageProblem included: a clear one-line error, never a traceback
        assert "\n" not in e.one_line()
    else:
        assert m.format.startswith("gentool.") and m.format_version >= 1


def test_unknown_manifest_fields_warn_but_load(tmp_path, capsys):
    out, _ = _make(tmp_path)
    data = json.loads((out / MANIFEST).read_text())
    data["from_the_future"] = {"x": 1}
    (out / MANIFEST).write_text(json.dumps(data))
    assert read_artifact(out, "tokenizer").kind == "tokenizer"
    assert "unknown manifest field(s) 'from_the_future'" in capsys.readouterr().err
    _make(tmp_path, "clean")
    read_artifact(tmp_path / "clean")
    assert capsys.readouterr().err == ""  # what gentool writes itself never warns


def test_manifests_record_the_invocation(tmp_path):
    from gentool.artifacts import INVOCATION

    token = INVOCATION.set({"command": "x", "arguments": {}, "options": {"seed": 3}})
    try:
        _, m = _make(tmp_path)
    finally:
        INVOCATION.reset(token)
    assert read_artifact(m.path).invocation == {"command": "x", "arguments": {}, "options": {"seed": 3}}
    _, plain = _make(tmp_path, "plain")
    assert plain.invocation == {} and plain.fingerprint == m.fingerprint  # how it was asked is not the recipe


def test_an_output_never_replaces_or_nests_in_an_input(tmp_path):
    from gentool.artifacts import check_output

    src = tmp_path / "lmA"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    for out, words in ((src, "is the input"), (tmp_path / "link", "is the input"), (src / "q8", "lies inside"),
                       (tmp_path, "contains")):
        with pytest.raises(UsageProblem, match=f"the output {words}"):
            check_output(out, force=True, sources=[src, "-", "builtin:shakespeare", None])
    check_output(tmp_path / "lmB", force=True, sources=[src])
    with pytest.raises(UsageProblem, match="the output is the input"):
        with create_artifact(src, "tokenizer", force=True, inputs=[{"role": "base", "path": str(src)}]):
            pass
    assert src.is_dir()


def test_temporary_siblings_of_dead_processes_are_swept(tmp_path):
    dead = tmp_path / ".art.tmp-999999999-abcd1234"  # no process has that id
    alive = tmp_path / f".art.tmp-{os.getpid()}-abcd1234"
    dead.mkdir()
    alive.mkdir()
    _make(tmp_path, "art")
    assert not dead.exists() and alive.exists()


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(GentoolError, match=f"no space left on {tmp_path}; free some space"):
        with create_artifact(tmp_path / "out", "tokenizer") as art:
            import safetensors.torch

            safetensors.torch.save_file({}, str(art.dir / "x.safetensors"))
    assert list(tmp_path.iterdir()) == []
    del save_file
