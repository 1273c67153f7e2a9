"""A finite NLL past 709 nats is an infinite perplexity in every report, not an OverflowError (issue 25 QA)."""

import math

import torch

from gentool.evaluation import metrics as M
from gentool.evaluation.compare import KLStats


def test_exp_or_inf():
    assert M.exp_or_inf(1.0) == math.exp(1.0)
    assert M.exp_or_inf(709.0) == math.exp(709.0)
    assert M.exp_or_inf(710.0) == math.inf and M.exp_or_inf(1e6) == math.inf
    assert math.isnan(M.exp_or_inf(math.nan))


def test_aggregates_of_huge_nlls_are_infinite():
    assert M.aggregate("word_perplexity", [(-4e5, 3), (-2e5, 5)])[0] == math.inf
    assert M.aggregate("byte_perplexity", [(-4e5, 30)])[0] == math.inf
    assert M.aggregate("bits_per_byte", [(-4e5, 30)])[0] == 4e5 / 30 / math.log(2)
    value, err = M.aggregate("perplexity", [-800.0, -900.0, -1000.0], bootstrap_iters=1000)
    assert value == math.inf and err is not None


def test_damage_report_of_a_model_with_huge_logits():
    """The compared model puts ~1e5 nats on the wrong token: PPL(Q) is infinite, PPL(base) is not."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=g)
    targets = torch.randint(0, 8, (16,), generator=g)
    quant = base.clone()
    quant[torch.arange(16), targets] -= 1e5
    stats = KLStats()
    stats.add(base, quant, targets)
    r = stats.report()
    nll_base = -base.double().log_softmax(-1)[torch.arange(16), targets].mean().item()
    assert r["ppl_quant"] == math.inf and r["ppl_ratio"] == math.inf
    assert math.isclose(r["ppl_base"], math.exp(nll_base), rel_tol=1e-6)
    assert r["ln_ppl_ratio"] > 1e4
