import json

import pytest


@pytest.fixture
def tokens(tiny_tokens):
    return tiny_tokens


def test_masked_lm_trains_scores_and_samples(tokens, tiny_tokenizer, tmp_path, cli):
    run = tmp_path / "mdlm"
    r = cli("train-diffusion", tokens, "-o", run, "--kind", "masked-lm", "--preset", "mini", "--seq-len", "32",
            "--steps", "250", "--batch-size", "32", "--lr", "5e-3", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["format"] == "gentool.diffusion-checkpoint" and manifest["contents"]["family"] == "masked-lm"
    assert manifest["contents"]["data_shape"]["mask_id"] == 400 and manifest["contents"]["tokens_seen"] > 0
    assert summary["val_loss"] < summary["val_unigram_entropy"], summary  # the bound beats the unigram entropy
    r = cli("perplexity", run, tokens, "--samples", "2", "--max-tokens", "2048", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["kind"].startswith("upper bound") and res["nll_stderr"] > 0 and res["bits_per_byte"] > 0
    r = cli("perplexity", run, tokens, "--steps", "10", "--max-tokens", "2048", "--device", "cpu", "--json")
    assert "discrete T=10" in json.loads(r.stdout)["kind"]
    args = ("sample", run, "-p", "SIR", "--max-new-tokens", "24", "--steps", "48", "--seed", "2", "--json",
            "--device", "cpu")
    a, b = cli(*args), cli(*args, "--no-cache")
    assert a.exit_code == 0, a.output
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["completion"] == jb["completion"] and ja["nfe"] < jb["nfe"] == 48  # caching: same text, fewer calls
    assert ja["nfe"] <= 24 and ja["sampler"] == "ancestral"  # a call only when something unmasks: <= 1 per token
    for sampler, most in (("confidence", 8), ("margin", 8), ("remdm:0.1", 8)):
        r = cli(*args[:-7], "--steps", "8", "--sampler", sampler, "--num-samples", "2", "--json", "--device", "cpu")
        recs = [json.loads(line) for line in r.stdout.splitlines()]
        assert r.exit_code == 0 and len(recs) == 2 and all(0 < x["nfe"] <= most for x in recs), r.output
    r = cli(*args, "--sampler", "euler")
    assert r.exit_code == 2 and "cannot sample a diffusion language model" in r.output
    r = cli("train-diffusion", tokens, "-o", tmp_path / "x", "--kind", "masked-lm", "--block-size", "4")
    assert r.exit_code == 2 and "--block-size and --mask-range are for --kind block-lm" in r.output
    r = cli("train-diffusion", tiny_tokenizer, "-o", tmp_path / "x", "--kind", "masked-lm", "--steps", "1")
    assert r.exit_code == 2 and "token-shards" in r.output and not (tmp_path / "x").exists()
