"""A diffusion LM's perplexity (its NELBO) scores exactly the tokens AR perplexity scores from the same data: every
token of the stream but the first, whatever the length (no tail dropped), each once, the tokens an earlier window
scored kept as clean context."""

import functools
import json
import math

import pytest
import torch

from gentool.lm.diffusion.block import block_nelbo_per_sequence
from gentool.lm.diffusion.masked import score_nelbo

V, MASK, W = 9, 8, 16


def uniform(x, **_):
    """A denoiser that spreads its probability evenly over the V - 1 real tokens: every masked token costs
    log(V - 1) nats, so any unbiased draw of the bound over c tokens is exactly c·log(V - 1)."""
    return torch.zeros(*x.shape, V)


@pytest.mark.parametrize("n", [W, W + 1, 2 * W + 5, 3 * W - 1, 5 * W + 7])
@pytest.mark.parametrize("block", [None, 1, 4])
def test_every_token_but_the_first_scored_once(n, block):
    ids = torch.randint(0, MASK, (n,), generator=torch.Generator().manual_seed(n))
    per_sequence = functools.partial(block_nelbo_per_sequence, block_size=block) if block else None
    kw = {"per_sequence": per_sequence} if per_sequence else {}
    for steps in (None, 8):
        out = score_nelbo(uniform, ids, seq_len=W, mask_id=MASK, schedule="loglinear", samples=2, steps=steps,
                          batch_size=3, device="cpu", **kw)
        assert out["tokens"] == n - 1  # what evaluation.windows scores of the same stream
        if steps is None:  # the count estimator's weights c/k over the scored positions only: exact here
            assert out["nll"] == pytest.approx(math.log(V - 1), rel=1e-6)


def test_context_positions_are_never_masked():
    seen = []

    def model(x, **_):
        seen.append(x.clone())
        return torch.zeros(*x.shape, V)

    ids = torch.randint(0, MASK, (2 * W + 5,), generator=torch.Generator().manual_seed(0))
    score_nelbo(model, ids, seq_len=W, mask_id=MASK, schedule="loglinear", samples=4, steps=None, batch_size=8,
                device="cpu")
    for x in seen:  # windows: [0, 16) scoring 1.., [15, 31) scoring 16.., [21, 37) scoring 31..
        assert not (x[0, :1] == MASK).any() and not (x[1, :1] == MASK).any() and not (x[2, :10] == MASK).any()


@pytest.fixture(scope="module")
def runs(tiny_tokens, tmp_path_factory):
    from typer.testing import CliRunner

    from gentool.cli import app

    d = tmp_path_factory.mktemp("dlm")
    common = ["--preset", "tiny", "--seq-len", "32", "--steps", "1", "--device", "cpu"]
    for name, args in (("ar", ["train-lm", "--micro-batch", "2"]), ("mdlm", ["train-diffusion", "--batch-size", "2"]),
                       ("bd3", ["train-diffusion", "--batch-size", "2", "--block-size", "4"])):
        r = CliRunner().invoke(app, [args[0], str(tiny_tokens), "-o", str(d / name), *args[1:], *common])
        assert r.exit_code == 0, r.output
    (d / "text.txt").write_text("Sir, I will be with you anon, and speak of it to my lord.\n" * 9)
    return d


@pytest.mark.parametrize("max_tokens", [100, 129, 200])
def test_ar_and_diffusion_perplexity_score_the_same_tokens(runs, tiny_tokens, cli, max_tokens):
    counts = {}
    for name in ("ar", "mdlm", "bd3"):
        for data in (tiny_tokens, runs / "text.txt"):
            r = cli("perplexity", runs / name, data, "--max-tokens", max_tokens, "--json", "--device", "cpu")
            assert r.exit_code == 0, r.output
            res = json.loads(r.stdout)
            counts[name, data] = res["tokens"]
            assert res["bits_per_byte"] > 0
    for data in (tiny_tokens, runs / "text.txt"):
        assert counts["ar", data] == counts["mdlm", data] == counts["bd3", data]
    assert counts["ar", tiny_tokens] == max_tokens
