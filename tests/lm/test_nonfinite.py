"""perplexity and sample in float16: weights float16 cannot hold are refused by name at load, and a run whose
logits or NLL come out NaN/inf exits 1 with one line instead of printing null or "⁇" with exit 0."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_broken", Path(__file__).parents[1] / "models" / "_broken.py")
_broken = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_broken)

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    w = tmp_path_factory.mktemp("nonfinite")
    good = _broken.checkpoint(w / "good", tiny_tokenizer)
    (w / "text.txt").write_text(TEXT)
    return w, good


def _one_error(r, words):
    assert r.exit_code == 1, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1, r.stderr
    assert words in lines[-1] and "internal error" not in r.stderr


@pytest.mark.parametrize("kind, words", [
    ("fp16big", "model.layers.0.mlp.up_proj.weight holds 1e+06, beyond float16"),
    ("activations", "not finite"),
])
def test_float16_runs_that_cannot_be_finite_exit_1(cli, tmp_path, world, kind, words):
    w, good = world
    bad = _broken.broken(good, tmp_path / kind, kind)
    _one_error(cli("perplexity", bad, w / "text.txt", "--dtype", "float16"), words)
    _one_error(cli("sample", bad, "-p", "hi", "--dtype", "float16", "--max-new-tokens", "2", "--temperature", "0"),
               words)
    _one_error(cli("sample", bad, "-p", "hi", "--dtype", "float16", "--max-new-tokens", "2", "--num-samples", "2",
                   "--json"), words)
    if kind == "fp16big":  # bfloat16 holds it
        assert cli("perplexity", bad, w / "text.txt", "--dtype", "bfloat16").exit_code == 0


def test_ordinary_float16_run_is_finite(cli, world):
    import json

    w, good = world
    r = cli("perplexity", good, w / "text.txt", "--dtype", "float16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["nll"] > 0
