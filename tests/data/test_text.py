"""Streaming text reading: documents and segments equal a whole-file reference, in any block size."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gentool.data import text as T
from gentool.errors import GentoolError, UsageProblem


def reference_blank_line(data: str) -> list[str]:
    """The obvious whole-file definition of blank-line documents."""
    blocks = data.replace("\r\n", "\n").split("\n\n")
    return [b.strip("\n") for b in blocks if b.strip()]


def documents(segments) -> list[str]:
    docs, cur = [], []
    for seg, last in segments:
        cur.append(seg)
        if last:
            docs.append("".join(cur))
            cur = []
    assert cur == []
    return docs


@settings(max_examples=200, deadline=None)
@given(data=st.text(alphabet="ab \n\r\u00e9", max_size=80), block=st.integers(1, 9), segment=st.integers(1, 12))
def test_blank_line_documents_match_whole_file_reference(tmp_path_factory, data, block, segment):
    f = tmp_path_factory.mktemp("t") / "x.txt"
    f.write_bytes(data.encode())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "BLOCK", block)
        got = documents(T.iter_segments([f], "blank-line", segment_chars=segment))
        assert got == reference_blank_line(data)
        assert documents(T.iter_segments([f], "file", segment_chars=segment)) == ([data] if data else [])


def test_invalid_utf8_is_counted_and_replaced(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok \xff\xfe\n\xef\xbf\xbd kept\n\n" + "é".encode()[:1])  # a real U+FFFD is not counted
    stats = T.TextStats()
    docs = documents(T.iter_segments([f], stats=stats))
    assert stats.invalid_utf8 == 3
    assert docs == ["ok \ufffd\ufffd\n\ufffd kept", "\ufffd"]


def test_jsonl_documents_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one\n\ntwo"}) + "\n\n" + json.dumps({"body": "x", "text": ""}) + "\n")
    assert documents(T.iter_segments([f])) == ["one\n\ntwo"]  # empty records are skipped
    f.write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(GentoolError, match="line 2: field 'text' is not a string"):
        list(T.iter_segments([f]))
    f.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(GentoolError, match="line 2: not a JSON object"):
        list(T.iter_segments([f]))


def test_expand_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.md").write_text("c")
    assert T.expand_inputs([str(tmp_path)]) == [tmp_path / "a.txt", tmp_path / "sub" / "b.txt"]
    assert T.expand_inputs([str(tmp_path)], glob="*.md") == [tmp_path / "c.md"]
    assert len(T.expand_inputs(["builtin:shakespeare"])) == 9
    assert [p.parent.name for p in T.expand_inputs(["builtin:shakespeare/comedies"])] == ["comedies"] * 4
    for bad, msg in ((["builtin:nope"], "no bundled corpus"), (["builtin:../.."], "no bundled corpus"),
                     ([str(tmp_path / "none")], "no such file"), ([], "no input"), (["-", "-"], "twice")):
        with pytest.raises(UsageProblem, match=msg):
            T.expand_inputs(bad)
    with pytest.raises(UsageProblem, match="no files matching"):
        T.expand_inputs([str(tmp_path)], glob="*.rst")


def test_bundled_corpus_size():
    total = sum(f.stat().st_size for f in T.bundled_corpus().rglob("*.txt"))
    assert 0.5e6 < total < 3e6
