"""tokenizer.ggml.add_bos_token carries the tokenizer's own BOS setting through export-gguf and back through
import-gguf (a post-processor that adds BOS, tokenizer_config.json's add_bos_token, SentencePiece's default), and
— with the llama.cpp build — gentool's `--protocol llama.cpp` perplexity equals llama-perplexity's on a model whose
tokenizer adds no BOS."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from _peers import llama_bin  # noqa: E402

from gentool.data.tokenizer import adds_bos, load_tokenizer  # noqa: E402
from gentool.gguf import export_gguf, import_gguf, read_gguf  # noqa: E402

_spec = importlib.util.spec_from_file_location("_hf_dirs", Path(__file__).parents[1] / "data" / "_hf_dirs.py")
_hf_dirs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hf_dirs)

TEXT = "Sir, I will be with you anon, and speak of it. To be, or not to be, that is the question.\n" * 12


def _checkpoint(directory: Path, tokenizer_dir: Path, vocab: int) -> Path:
    from gentool.artifacts import create_artifact
    from gentool.config import config_from_preset
    from gentool.models.checkpoint import save_lm
    from gentool.models.transformer import Transformer

    cfg = config_from_preset("tiny", vocab_size=vocab, max_position_embeddings=64)
    m = Transformer(cfg)
    m.init_weights(0)
    with create_artifact(directory, "lm-checkpoint", config={"test": True}) as art:
        save_lm(m, cfg, art.dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, art.dir / name)
    return directory


def _hf_checkpoint(tmp_path, name, **tokenizer):
    t = _hf_dirs.hf_dir(tmp_path / f"tok-{name}", **tokenizer)
    cfg = json.loads((t / "tokenizer_config.json").read_text())
    (t / "tokenizer_config.json").write_text(json.dumps({**cfg, "gguf_pre": "gpt-2"}))  # llama.cpp's GPT-2 regex
    return _checkpoint(tmp_path / name, t, load_tokenizer(t).vocab_size)


@pytest.mark.parametrize("post, add_bos_token, expected", [("template", None, True), (None, False, False),
                                                           (None, True, True)])
def test_hf_tokenizer_bos_survives_export_and_import(tmp_path, post, add_bos_token, expected):
    ck = _hf_checkpoint(tmp_path, "lm", post=post, add_bos_token=add_bos_token)
    export_gguf(ck, tmp_path / "m.gguf", qtype="f32")
    assert read_gguf(tmp_path / "m.gguf").tokenizer["add_bos"] is expected
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    before, after = load_tokenizer(ck), load_tokenizer(tmp_path / "back")
    assert adds_bos(before) is adds_bos(after) is expected
    for text in _hf_dirs.TEXT:
        assert after.encode_default(text) == before.encode_default(text)


@pytest.mark.parametrize("config, expected", [(None, True), ({"add_bos_token": False}, False)])
def test_sentencepiece_bos_setting_survives_export_and_import(tmp_path, tiny_tokenizer, config, expected):
    t = tmp_path / "tok"
    t.mkdir()
    shutil.copy(tiny_tokenizer / "tokenizer.model", t / "tokenizer.model")
    if config is not None:
        (t / "tokenizer_config.json").write_text(json.dumps(config))
    ck = _checkpoint(tmp_path / "lm", t, 400)
    export_gguf(ck, tmp_path / "m.gguf", qtype="f32")
    assert read_gguf(tmp_path / "m.gguf").tokenizer["add_bos"] is expected
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert adds_bos(load_tokenizer(tmp_path / "back")) is expected


@pytest.mark.skipif(llama_bin() is None, reason="llama.cpp tools not built ($GENTOOL_LLAMA_CPP_BIN)")
@pytest.mark.parametrize("post, add_bos_token", [(None, False), ("template", None)])
def test_llamacpp_protocol_equals_llama_perplexity(tmp_path, post, add_bos_token):
    """The same tokens (llama-perplexity's, read from its --kl-divergence-base file: no BOS when the tokenizer adds
    none) and the same perplexity, to float32 accumulation order."""
    from gentool.evaluation.compare import llama_logits_tokens
    from gentool.lm.perplexity import score_checkpoint

    ck = _hf_checkpoint(tmp_path, "lm", post=post, add_bos_token=add_bos_token)
    export_gguf(ck, tmp_path / "m.gguf", qtype="f32")
    (tmp_path / "eval.txt").write_text(TEXT)
    res = subprocess.run([str(llama_bin() / "llama-perplexity"), "-m", str(tmp_path / "m.gguf"), "-f",
                          str(tmp_path / "eval.txt"), "-c", "32", "-b", "32", "-t", "2", "--kl-divergence-base",
                          str(tmp_path / "base.kld")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    # the running value after the last chunk is the final estimate (llama.cpp's log thread can lose the
    # "Final estimate" line at exit)
    ppl = float(re.findall(r"\[\d+\]([\d.]+),", res.stdout + res.stderr)[-1])
    n_ctx, _, theirs = llama_logits_tokens(tmp_path / "base.kld")
    tok = load_tokenizer(ck)
    ours = tok.encode(TEXT, bos=adds_bos(tok))
    assert n_ctx == 32 and theirs.tolist() == ours[:len(theirs)] and (ours[0] == tok.bos_id) is (post is not None)
    got = score_checkpoint(ck, [str(tmp_path / "eval.txt")], window=32, protocol="llama.cpp")
    assert got["bos"] is (post is not None)
    assert got["perplexity"] == pytest.approx(ppl, rel=2e-3)
