"""`tokenize encode --format chat|prompt-completion|preference`: example shards with loss masks and pairs."""

import json

import numpy as np
import pytest

from gentool.data.chat import ChatTemplate
from gentool.data.examples import open_masked, open_pairs
from gentool.data.tokenizer import load_tokenizer
from gentool.tokenize_examples import detect_format, encode_examples


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(i):
    return {"messages": [{"role": "user", "content": f"Speak line {i}."},
                         {"role": "assistant", "content": "To be, or not to be" + "!" * i}]}


def test_chat_shards_hold_template_ids_and_assistant_mask(tmp_path, tiny_tokenizer):
    rows = [_chat(i) for i in range(12)]
    src = _jsonl(tmp_path / "chats.jsonl", rows)
    assert detect_format([str(src)]) == "chat"
    m = encode_examples([str(src)], tiny_tokenizer, tmp_path / "sft", fmt="chat", val_fraction=0.25)
    tok = load_tokenizer(tiny_tokenizer)
    t = ChatTemplate.of(tok)
    assert m.contents["format"] == "chat" and m.contents["template_sha256"] == t.hash
    got = {}
    for split in m.contents["splits"]:
        ex = open_masked(tmp_path / "sft", split)
        for i in range(len(ex)):
            ids, mask = ex.example(i)
            got[tuple(ids)] = mask
    assert len(got) == 12 and m.contents["examples"] == 12
    for r in rows:
        ids, mask = t.encode(r["messages"])
        assert got[tuple(ids)].tolist() == mask
    assert m.contents["trained_tokens"] == sum(int(v.sum()) for v in got.values())


def test_overlong_counted(tmp_path, tiny_tokenizer):
    src = _jsonl(tmp_path / "c.jsonl", [_chat(i) for i in range(6)] + [_chat(60)])
    t = ChatTemplate.of(load_tokenizer(tiny_tokenizer))
    limit = len(t.encode(_chat(5)["messages"])[0]) + 2
    assert len(t.encode(_chat(60)["messages"])[0]) > limit
    m = encode_examples([str(src)], tiny_tokenizer, tmp_path / "a", fmt="chat", max_len=limit, overlong="drop",
                        val_fraction=0)
    assert m.contents["dropped"] == 1 and m.contents["examples"] == 6
    m = encode_examples([str(src)], tiny_tokenizer, tmp_path / "b", fmt="chat", max_len=limit, val_fraction=0)
    assert m.contents["truncated"] == 1 and m.contents["examples"] == 7
    ex = open_masked(tmp_path / "b")
    assert max(len(ex.example(i)[0]) for i in range(len(ex))) == limit


def test_prompt_completion_masks_completion(tmp_path, tiny_tokenizer):
    src = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Romeo: ", "completion": "But soft!"}])
    assert detect_format([str(src)]) == "prompt-completion"
    encode_examples([str(src)], tiny_tokenizer, tmp_path / "pc", fmt="prompt-completion", val_fraction=0)
    tok = load_tokenizer(tiny_tokenizer)
    ids, mask = open_masked(tmp_path / "pc").example(0)
    p = [tok.bos_id] + tok.encode("Romeo: ")
    assert ids.tolist() == p + tok.encode("But soft!") + [tok.eos_id]
    assert mask.tolist() == [False] * len(p) + [True] * (len(ids) - len(p))
    encode_examples([str(src)], tiny_tokenizer, tmp_path / "all", fmt="prompt-completion", val_fraction=0,
                    train_on="all")
    assert open_masked(tmp_path / "all").example(0)[1].all()


def test_preference_pairs_kept_together(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Line {i}: ", "chosen": "good" * (i + 1), "rejected": "bad"} for i in range(5)]
    rows.append({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yes"}],
                 "rejected": [{"role": "assistant", "content": "No"}]})
    src = _jsonl(tmp_path / "p.jsonl", rows)
    assert detect_format([str(src)]) == "preference"
    m = encode_examples([str(src)], tiny_tokenizer, tmp_path / "pref", fmt="preference", val_fraction=0)
    assert m.contents["pairs"] == 6
    tok = load_tokenizer(tiny_tokenizer)
    pairs = open_pairs(tmp_path / "pref")
    for i in range(5):
        p, c, r = pairs.pair(i)
        assert p.tolist() == [tok.bos_id] + tok.encode(f"Line {i}: ")
        assert c.tolist() == tok.encode("good" * (i + 1)) + [tok.eos_id]
        assert r.tolist() == tok.encode("bad") + [tok.eos_id]
    p, c, r = pairs.pair(5)
    t = ChatTemplate.of(tok)
    whole, _ = t.encode(rows[5]["prompt"] + rows[5]["chosen"])
    assert np.concatenate([p, c]).tolist() == whole
    assert tok.decode(c.tolist()) == "Yes\n"


def test_ambiguous_keys_refused(tmp_path):
    from gentool.errors import UsageProblem

    src = _jsonl(tmp_path / "x.jsonl", [{"messages": [], "prompt": "a", "completion": "b"}])
    with pytest.raises(UsageProblem, match="cannot tell the format"):
        detect_format([str(src)])
    assert detect_format([str(src)], "chat") == "chat"
