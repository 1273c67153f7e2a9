"""`train-diffusion --kind block-lm`, `perplexity` and `sample` on a block-diffusion LM, end to end, and the one-line
errors for bad input."""

import json

import pytest

pytestmark = pytest.mark.slow  # trains a small model (~1 min on 2 CPU cores)


@pytest.fixture(scope="module")
def run(tiny_tokens, tmp_path_factory):
    from typer.testing import CliRunner

    from gentool.cli import app

    out = tmp_path_factory.mktemp("runs") / "bd3"
    r = CliRunner().invoke(app, ["train-diffusion", str(tiny_tokens), "-o", str(out), "--block-size", "4",
                                 "--preset", "tiny", "--seq-len", "32", "--steps", "150", "--batch-size", "16",
                                 "--lr", "1e-2", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_trains_and_scores(run, tiny_tokens, cli):
    out, summary = run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["contents"]["family"] == "block-lm"
    assert manifest["contents"]["data_shape"]["block_size"] == 4 and manifest["contents"]["mask_range"] == [0.45, 0.95]
    assert summary["val_loss"] < summary["val_unigram_entropy"], summary
    r = cli("perplexity", out, tiny_tokens, "--samples", "2", "--max-tokens", "1024", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["kind"].startswith("upper bound") and res["block_size"] == 4 and res["nll_stderr"] > 0
    assert res["bits_per_byte"] > 0 and res["tokens"] == 1024


@pytest.mark.parametrize("sampler", ["ancestral", "confidence", "margin", "remdm:0.05"])
def test_samples_with_every_sampler(run, cli, sampler):
    out, _ = run
    r = cli("sample", out, "-p", "SIR", "--max-new-tokens", "40", "--steps", "2", "--sampler", sampler,
            "--num-samples", "2", "--seed", "3", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 2 and all(rec["sampler"] == sampler and rec["tokens_per_s"] > 0 for rec in recs)
    assert all(0 < rec["nfe"] <= 2 * 11 for rec in recs)  # 2 steps for each of the 11 blocks the prompt reaches
    assert all(rec["stopped"] in ("eos", "length") for rec in recs)
    again = cli("sample", out, "-p", "SIR", "--max-new-tokens", "40", "--steps", "2", "--sampler", sampler,
                "--num-samples", "2", "--seed", "3", "--json", "--device", "cpu")
    assert [json.loads(x)["completion"] for x in again.stdout.splitlines()] == [rec["completion"] for rec in recs]


def test_stop_strings_cut_the_completion(run, cli):
    out, _ = run
    base = cli("sample", out, "-p", "", "--max-new-tokens", "48", "--temperature", "0", "--json", "--device", "cpu")
    text = json.loads(base.stdout)["completion"]
    stop = text[5:7] if len(text) > 8 else None
    if stop is None or not stop.strip():
        pytest.skip("the greedy sample is too short to hold a stop string")
    r = cli("sample", out, "-p", "", "--max-new-tokens", "48", "--temperature", "0", "--json", "--device", "cpu",
            "--stop", stop)
    rec = json.loads(r.stdout)
    assert rec["stopped"] == "stop" and rec["completion"] == text[:text.find(stop)]


def test_bad_input_is_one_line(run, tiny_tokens, cli, tmp_path):
    from gentool.tokenize import encode_corpus, train_tokenizer

    out, _ = run
    r = cli("train-diffusion", tiny_tokens, "-o", tmp_path / "x", "--block-size", "5", "--seq-len", "32",
            "--steps", "1")
    assert r.exit_code == 2 and "--block-size 5 does not divide" in r.output and not (tmp_path / "x").exists()
    assert len(r.output.strip().splitlines()) == 1
    r = cli("sample", out, "-p", "", "--sampler", "ddim", "--device", "cpu")
    assert r.exit_code == 2 and "cannot sample a diffusion language model" in r.output
    assert len(r.output.strip().splitlines()) == 1
    train_tokenizer(["builtin:shakespeare/comedies"], tmp_path / "tok2", vocab_size=360)
    encode_corpus(["builtin:shakespeare/comedies"], tmp_path / "tok2", tmp_path / "other", workers=1)
    r = cli("perplexity", out, tmp_path / "other", "--device", "cpu")
    assert r.exit_code == 2 and "different tokenizer" in r.output and len(r.output.strip().splitlines()) == 1
    r = cli("perplexity", out, tmp_path / "other", "--device", "cpu", "--allow-tokenizer-mismatch", "--max-tokens",
            "256", "--json")
    assert r.exit_code == 0, r.output


def test_block_size_one_scores_exactly_and_ar_models_refuse_diffusion_samplers(tiny_tokens, cli, tmp_path):
    r = cli("train-diffusion", tiny_tokens, "-o", tmp_path / "b1", "--block-size", "1", "--preset", "tiny",
            "--seq-len", "16", "--steps", "3", "--batch-size", "4", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = cli("perplexity", tmp_path / "b1", tiny_tokens, "--max-tokens", "256", "--device", "cpu", "--json")
    res = json.loads(r.stdout)
    assert res["kind"].startswith("exact") and res["samples"] == 1
    r = cli("train-lm", tiny_tokens, "-o", tmp_path / "ar", "--preset", "tiny", "--seq-len", "16", "--steps",
            "2", "--micro-batch", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = cli("sample", tmp_path / "ar", "-p", "", "--sampler", "confidence", "--device", "cpu")
    assert r.exit_code == 2 and "--sampler confidence is for diffusion models" in r.output
