"""`tokenize encode --tokenizer CHECKPOINT`: a model imported from GGUF (or any checkpoint, or a tokenizer.json)
encodes its own fine-tuning data, so import -> encode -> LoRA fine-tune -> merge -> export runs from the CLI."""

import json

import numpy as np
import pytest

from gentool.data.shards import open_shards
from gentool.data.tokenizer import file_id, load_tokenizer

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n\n" * 30
SMALL = ["--seq-len", "16", "--micro-batch", "2", "--device", "cpu"]


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_import_encode_lora_merge_export(cli, tiny_tokens, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    r = cli("train-lm", tiny_tokens, "-o", tmp_path / "lm", "--preset", "tiny", "--steps", "1", *SMALL)
    assert r.exit_code == 0, r.output
    assert cli("export-gguf", tmp_path / "lm", "-o", tmp_path / "lm.gguf", "--type", "f32").exit_code == 0
    assert cli("import-gguf", tmp_path / "lm.gguf", "-o", tmp_path / "imported").exit_code == 0
    imported = tmp_path / "imported"
    r = cli("tokenize", "encode", tmp_path / "text.txt", "--tokenizer", imported, "-o", tmp_path / "tokens",
            "--val-fraction", "0", "--workers", "1")
    assert r.exit_code == 0, r.output
    shards = open_shards(tmp_path / "tokens")
    tok = load_tokenizer(imported)
    assert shards.tokenizer_id == manifest(imported)["contents"]["tokenizer_id"] == tok.sha256
    assert shards.tokens(0, len(shards)).tolist()[:10] == tok.encode(TEXT.split("\n\n")[0])[:10]
    r = cli("train-lm", tmp_path / "tokens", "-o", tmp_path / "ada", "--init-from", imported, "--lora-rank", "2",
            "--steps", "2", *SMALL)
    assert r.exit_code == 0, r.output
    assert cli("lora-merge", imported, tmp_path / "ada", "-o", tmp_path / "merged").exit_code == 0
    assert file_id(tmp_path / "merged" / "tokenizer.model") == tok.sha256
    r = cli("export-gguf", tmp_path / "merged", "-o", tmp_path / "merged.gguf", "--type", "f32")
    assert r.exit_code == 0, r.output
    assert cli("import-gguf", tmp_path / "merged.gguf", "-o", tmp_path / "again").exit_code == 0
    assert manifest(tmp_path / "again")["contents"]["tokenizer_id"] == tok.sha256  # the same tokenizer all along


def test_a_tokenizer_json_encodes_like_the_tokenizers_library(cli, tmp_path):
    """A Hugging Face tokenizer.json (a checkpoint directory, or the file itself) encodes through `tokenizers`,
    without special tokens, EOS after each document (from tokenizer_config.json)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(TEXT.split("\n"), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ck = tmp_path / "hf"
    ck.mkdir()
    t.save(str(ck / "tokenizer.json"))
    (ck / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))
    docs = ["to be or not to be", "that is the question"]
    (tmp_path / "text.txt").write_text("\n\n".join(docs) + "\n")
    for tokenizer, out in ((ck, "a"), (ck / "tokenizer.json", "b")):
        r = cli("tokenize", "encode", tmp_path / "text.txt", "--tokenizer", tokenizer, "-o", tmp_path / out,
                "--val-fraction", "0", "--workers", "1")
        assert r.exit_code == 0, r.output
        eos = t.token_to_id("</s>")
        want = [i for d in docs for i in t.encode(d, add_special_tokens=False).ids + [eos]]
        shards = open_shards(tmp_path / out)
        assert shards.tokens(0, len(shards)).tolist() == want and shards.eos_id == eos
        assert shards.tokenizer_file() == (ck / "tokenizer.json").resolve()
    assert np.dtype(manifest(tmp_path / "a")["contents"]["dtype"]) == np.uint16
