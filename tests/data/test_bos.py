"""Whether text starts with BOS is the tokenizer's own setting, read in one place (`adds_bos`): tokenizer.json's
post-processor first, then tokenizer_config.json's add_bos_token (llama.cpp's converter and transformers 5 read
them in that order), SentencePiece's default (BOS, as llama.cpp) unless a tokenizer_config.json beside it says no."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from gentool.data.tokenizer import Tokenizer, adds_bos, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")
_spec = importlib.util.spec_from_file_location("_hf_dirs", Path(__file__).with_name("_hf_dirs.py"))
_hf_dirs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hf_dirs)
hf_dir, TEXT = _hf_dirs.hf_dir, _hf_dirs.TEXT


CASES = [  # (post-processor, add_bos_token, adds BOS, decided by)
    ("template", None, True, "post-processor"),
    ("template", False, True, "post-processor"),
    ("bytelevel", True, False, "post-processor"),
    (None, False, False, "add_bos_token"),
    (None, True, True, "add_bos_token"),
    (None, None, False, "none"),
]


@pytest.mark.parametrize("post, add_bos_token, expected, source", CASES)
def test_hf_tokenizer_bos_setting(tmp_path, post, add_bos_token, expected, source):
    tok = load_tokenizer(hf_dir(tmp_path, post=post, add_bos_token=add_bos_token))
    assert adds_bos(tok) is expected and source in tok.add_bos_source
    assert (tok.encode_default(TEXT[0])[0] == tok.bos_id) is expected


@pytest.mark.oracle
@pytest.mark.parametrize("post, add_bos_token, expected, source", [c for c in CASES if c[0] or c[1] is not True])
def test_hf_bos_setting_equals_transformers(tmp_path, post, add_bos_token, expected, source):
    """Without a post-processor transformers 5's generic backend ignores add_bos_token: True, where llama.cpp's
    converter writes tokenizer.ggml.add_bos_token = true; gentool follows the GGUF (that case is left out)."""
    transformers = pytest.importorskip("transformers")
    d = hf_dir(tmp_path, post=post, add_bos_token=add_bos_token)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    assert (ref(TEXT[0])["input_ids"][0] == ref.bos_token_id) is adds_bos(load_tokenizer(d))


def test_sentencepiece_adds_bos_unless_its_tokenizer_config_says_no(tmp_path, tiny_tokenizer):
    shutil.copy(tiny_tokenizer / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert adds_bos(tok) and tok.add_bos_source == "SentencePiece default"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert not adds_bos(tok) and "tokenizer_config.json" in tok.add_bos_source
    assert not adds_bos(None)
