"""Text perplexity puts BOS first only where the tokenizer adds one, and the llama.cpp protocol overwrites each
chunk's first token only then (llama-perplexity: `if (add_bos && j == 0) tokens[seq_start] = bos`); the report says
which. `--reference` scores under the protocol asked for. The default window is the length the model was trained
on when its manifest records one."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gentool.config import config_from_preset
from gentool.models.checkpoint import load_lm, save_lm
from gentool.models.transformer import Transformer

pytest.importorskip("tokenizers")

TEXT = "Sir, I will be with you anon, and speak of it. To be, or not to be, that is the question.\n" * 12


def _lm(directory, tokenizer_dir, *, vocab=320, context=64):
    cfg = config_from_preset("tiny", vocab_size=vocab, max_position_embeddings=context)
    m = Transformer(cfg)
    m.init_weights(0)
    directory.mkdir(parents=True)
    save_lm(m, cfg, directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("_hf_dirs", Path(__file__).parents[1] / "data" / "_hf_dirs.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    hf_dir = helpers.hf_dir
    d = tmp_path_factory.mktemp("bos")
    (d / "text.txt").write_text(TEXT)
    return {"nobos": _lm(d / "nobos", hf_dir(d / "t1", post=None, add_bos_token=False)),  # SmolLM2's case
            "bos": _lm(d / "bos", hf_dir(d / "t2", post="template")), "dir": d}


def _llamacpp_reference(model, ids, window, bos_id):
    """llama-perplexity's loop, written out: chunks of `window`, BOS in place of the first token when the
    tokenizer adds one, the second half of each chunk scored."""
    total, n = 0.0, 0
    with torch.no_grad():
        for c in range(len(ids) // window):
            x = ids[c * window:(c + 1) * window].clone()
            if bos_id is not None:
                x[0] = bos_id
            logits = model(x[None, :-1])[0]
            first = window // 2
            total += F.cross_entropy(logits[first:], x[first + 1:], reduction="sum").item()
            n += window - first - 1
    return total / n, n


@pytest.mark.parametrize("name", ["nobos", "bos"])
def test_llamacpp_protocol_follows_the_tokenizers_bos(models, name):
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.perplexity import score_checkpoint

    path = models[name]
    tok = load_tokenizer(path)
    res = score_checkpoint(path, [str(models["dir"] / "text.txt")], window=32, protocol="llama.cpp")
    bos = name == "bos"
    ids = torch.tensor(tok.encode(TEXT, bos=bos))  # what llama-perplexity tokenizes: BOS only where added
    nll, n = _llamacpp_reference(load_lm(path).model, ids, 32, tok.bos_id if bos else None)
    assert res["bos"] is bos and res["tokens"] == n
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert ("post-processor" if bos else "add_bos_token") in res["bos_rule"]


def test_gentool_protocol_scores_the_first_text_token_only_after_a_bos(models):
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.perplexity import score_checkpoint

    text = [str(models["dir"] / "text.txt")]
    n_text = len(load_tokenizer(models["nobos"]).encode(TEXT))
    plain = score_checkpoint(models["nobos"], text, window=32)
    with_bos = score_checkpoint(models["bos"], text, window=32)
    assert plain["bos"] is False and plain["tokens"] == n_text - 1  # no BOS: the first token is context only
    assert with_bos["bos"] is True and with_bos["tokens"] == n_text


def test_reference_honours_protocol(models, cli):
    text = models["dir"] / "text.txt"
    out = {}
    for proto in ("gentool", "llama.cpp"):
        r = cli("perplexity", models["nobos"], text, "--reference", models["nobos"], "--protocol", proto,
                "--window", "32", "--json", "--device", "cpu")
        assert r.exit_code == 0, r.output
        out[proto] = json.loads(r.stdout)
        plain = json.loads(cli("perplexity", models["nobos"], text, "--protocol", proto, "--window", "32", "--json",
                               "--device", "cpu").stdout)
        assert out[proto]["protocol"] == proto and out[proto]["tokens"] == plain["tokens"]
        assert out[proto]["ppl_base"] == pytest.approx(plain["perplexity"], rel=1e-4)
        assert out[proto]["bos"] is False and out[proto]["kl_mean"] == pytest.approx(0, abs=1e-9)
    assert out["llama.cpp"]["tokens"] < out["gentool"]["tokens"]


def test_default_window_is_the_trained_length(tiny_tokens, tmp_path, cli):
    r = cli("train-lm", tiny_tokens, "-o", tmp_path / "lm", "--preset", "tiny", "--seq-len", "24", "--steps", "1",
            "--micro-batch", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    context = json.loads((tmp_path / "lm" / "config.json").read_text())["max_position_embeddings"]
    assert context > 24
    r = cli("perplexity", tmp_path / "lm", tiny_tokens, "--max-tokens", "200", "--json", "--device", "cpu")
    res = json.loads(r.stdout)
    assert res["window"] == 24 and res["window_from"].startswith("trained")
    hf = tmp_path / "hf"  # the same weights without a manifest: nothing records a trained length
    hf.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(tmp_path / "lm" / f, hf / f)
    res = json.loads(cli("perplexity", hf, tiny_tokens, "--max-tokens", "200", "--json", "--device", "cpu",
                         "--allow-tokenizer-mismatch").stdout)
    assert res["window"] == context and res["window_from"].startswith("model's maximum context")
    res = json.loads(cli("perplexity", tmp_path / "lm", tiny_tokens, "--max-tokens", "200", "--window", "40",
                         "--json", "--device", "cpu").stdout)
    assert res["window"] == 40 and res["window_from"] == "--window"


@pytest.mark.parametrize("name", ["nobos", "bos"])
def test_calibration_text_starts_with_bos_only_where_the_tokenizer_adds_one(models, name):
    from gentool.data.tokenizer import load_tokenizer
    from gentool.quantize.calibrate import calibration_ids

    lm = load_lm(models[name])
    ids, _, _ = calibration_ids(lm, [str(models["dir"] / "text.txt")], max_tokens=50)
    assert ids.tolist() == load_tokenizer(models[name]).encode(TEXT, bos=name == "bos")[:50]
