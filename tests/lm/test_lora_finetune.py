import json

import pytest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gentool.tokenize import encode_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("lora")
    train_tokenizer(["builtin:shakespeare"], d / "tok", vocab_size=400)
    for name in ("tragedies", "comedies"):
        encode_corpus([f"builtin:shakespeare/{name}"], d / "tok", d / name, workers=1)
    return d


ARGS = ["--preset", "tiny", "--seq-len", "32", "--micro-batch", "8", "--device", "cpu", "--lr", "1e-2"]


def _nll(cli, *args):
    r = cli("perplexity", *args, "--json", "--device", "cpu", "--max-tokens", "4000", "--window", "32")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["nll"]


def test_lora_adapts_to_shifted_corpus_and_merges_exactly(data, cli):
    base, ada, merged = data / "base", data / "ada", data / "merged"
    assert cli("train-lm", data / "tragedies", "-o", base, "--steps", "60", *ARGS).exit_code == 0
    before = load_file(str(base / "model.safetensors"))
    r = cli("train-lm", data / "comedies", "-o", ada, "--init-from", base, "--lora-rank", "8", "--steps", "40",
            *ARGS)
    assert r.exit_code == 0, r.output
    manifest = json.loads((ada / "manifest.json").read_text())
    assert manifest["format"] == "gentool.lora-adapter"
    after = load_file(str(base / "model.safetensors"))
    assert all((before[k] == after[k]).all() for k in before)  # the base never changes
    base_nll = _nll(cli, base, data / "comedies")
    ada_nll = _nll(cli, base, data / "comedies", "--adapter", ada)
    assert ada_nll < base_nll - 0.02, (base_nll, ada_nll)
    assert cli("lora-merge", base, ada, "-o", merged).exit_code == 0
    assert _nll(cli, merged, data / "comedies") == pytest.approx(ada_nll, rel=1e-5)
    s1 = cli("sample", base, "--adapter", ada, "-p", "SIR", "--temperature", "0", "--max-new-tokens", "20",
             "--device", "cpu")
    s2 = cli("sample", merged, "-p", "SIR", "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu")
    assert s1.exit_code == 0 and s1.stdout == s2.stdout
