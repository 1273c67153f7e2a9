"""Block diffusion (BD3-LM): the two-stream attention against transformers with a hand-built mask, block size 1
against the exact AR NLL of the same weights, block size = length against MDLM, KV-cached sampling against
uncached, the samplers' network-call counts and distributions."""

import math

import pytest
import torch
import torch.nn.functional as F

from gentool.config import config_from_preset
from gentool.errors import UsageProblem
from gentool.lm.diffusion.block import (BlockObjective, block_nelbo_per_sequence, check_block_size,
                                        default_mask_range)
from gentool.lm.diffusion.masked import MaskSchedule, masked_diffusion_loss, nelbo_per_sequence
from gentool.lm.diffusion.samplers import Sampler, denoise, generate_blocks, parse_sampler
from gentool.models.transformer import Transformer

V = 48
MASK = V - 1


def _model(causal=False, kv_heads=2, seed=0):
    cfg = config_from_preset("tiny", vocab_size=V, num_key_value_heads=kv_heads)
    m = Transformer(cfg, causal=causal)
    m.init_weights(seed)
    with torch.no_grad():  # larger logits than the init's, so that errors cannot hide in a flat distribution
        m.lm_head.weight.mul_(20)
    return m.eval(), cfg


def _naive_two_stream_mask(length, block):
    """Allowed (query, key) pairs over xt ⊕ x0, written out one by one."""
    n = 2 * length
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            qb, kb = (q % length) // block, (k % length) // block
            if q < length:   # noised query: its own noised block, and clean blocks strictly before
                allowed[q, k] = (k < length and kb == qb) or (k >= length and kb < qb)
            else:            # clean query: clean blocks up to its own
                allowed[q, k] = k >= length and kb <= qb
    return allowed


@pytest.mark.oracle
@pytest.mark.parametrize("block,kv_heads", [(1, 2), (4, 2), (4, 4), (12, 1)])
def test_two_stream_logits_equal_transformers_with_explicit_mask(tmp_path, block, kv_heads):
    transformers = pytest.importorskip("transformers")
    from gentool.models.checkpoint import save_lm

    model, cfg = _model(kv_heads=kv_heads)
    save_lm(model, cfg, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    length = 12
    x0 = torch.randint(0, MASK, (2, length))
    xt = torch.where(torch.rand(x0.shape) < 0.5, MASK, x0)
    mask = torch.zeros(2 * length, 2 * length).masked_fill(~_naive_two_stream_mask(length, block), -math.inf)
    pos = torch.arange(length).repeat(2)[None].expand(2, -1)
    with torch.no_grad():
        ours = model(xt, block_size=block, clean_ids=x0)
        ref = hf(torch.cat([xt, x0], 1), attention_mask=mask[None, None].expand(2, 1, -1, -1),
                 position_ids=pos).logits[:, :length]
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_training_pass_sees_what_the_sampler_sees():
    """Block b's logits in the two-stream training pass equal those of the sampler's one-stream block-causal pass
    over [clean blocks before b, noised block b]."""
    model, _ = _model()
    x0 = torch.randint(0, MASK, (2, 12))
    xt = torch.where(torch.rand(x0.shape) < 0.5, MASK, x0)
    with torch.no_grad():
        two = model(xt, block_size=4, clean_ids=x0)
        for b in range(3):
            one = model(torch.cat([x0[:, :4 * b], xt[:, 4 * b:4 * b + 4]], 1), block_size=4)[:, -4:]
            assert torch.allclose(one, two[:, 4 * b:4 * b + 4], atol=1e-5)


def test_block_size_1_equals_the_exact_ar_nll_of_the_same_weights():
    """With every token masked (t = 1) the block-1 objective is sum_l -log p(x_l | x_<l): the NLL of the AR model
    these weights define, computed here token by token with the causal transformer on [x_<l, MASK]."""
    model, cfg = _model()
    ar = Transformer(cfg, causal=True).eval()
    ar.load_state_dict(model.state_dict())
    x0 = torch.randint(0, MASK, (3, 16))
    with torch.no_grad():
        ref = torch.zeros(3)
        for i in range(16):
            logits = ar(torch.cat([x0[:, :i], torch.full((3, 1), MASK)], 1))[:, -1].float()
            logits[:, MASK] = -math.inf
            ref += F.cross_entropy(logits, x0[:, i], reduction="none")
        lo, hi = default_mask_range(1, 16)
        train = block_nelbo_per_sequence(model, x0, MASK, MaskSchedule(), block_size=1, estimator="time",
                                         t_range=(lo, hi), generator=torch.Generator().manual_seed(0))
        bound = block_nelbo_per_sequence(model, x0, MASK, MaskSchedule(), block_size=1,
                                         generator=torch.Generator().manual_seed(0))
    assert (lo, hi) == (1.0, 1.0)
    assert torch.allclose(train, ref, rtol=1e-5, atol=1e-4), (train, ref)  # the training loss...
    assert torch.allclose(bound, ref, rtol=1e-5, atol=1e-4), (bound, ref)  # ...and the bound perplexity reports


def test_block_size_equal_to_length_is_mdlm():
    model, _ = _model()
    x0 = torch.randint(0, MASK, (4, 16))
    for seed in range(3):  # the bound's draws (count estimator)
        ours = block_nelbo_per_sequence(model, x0, MASK, MaskSchedule(), block_size=16,
                                        generator=torch.Generator().manual_seed(seed))
        mdlm = nelbo_per_sequence(model, x0, MASK, MaskSchedule(), generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(ours, mdlm, rtol=1e-5, atol=1e-4), (ours, mdlm)
    assert default_mask_range(16, 16) == (1e-3, 1.0)
    ours = block_nelbo_per_sequence(model, x0, MASK, MaskSchedule(), block_size=16, estimator="time",
                                    t_range=default_mask_range(16, 16), generator=torch.Generator().manual_seed(0))
    loss = masked_diffusion_loss(model, x0, MASK, MaskSchedule(), generator=torch.Generator().manual_seed(0))
    assert math.isclose(loss.item(), ours.sum().item() / x0.numel(), rel_tol=1e-5)  # MDLM's training loss too


def test_block_bound_is_unbiased_for_an_exact_iid_model():
    """A context-free model of i.i.d. data: each block's NELBO averages to the data's cross-entropy."""
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])

    def oracle(z, block_size=None, clean_ids=None):
        return torch.log(torch.cat([p, torch.full((V - 4,), 1e-12)])).expand(*z.shape, V).clone()

    g = torch.Generator().manual_seed(1)
    x0 = torch.multinomial(p, 256 * 16, replacement=True, generator=g).view(256, 16)
    nats = block_nelbo_per_sequence(oracle, x0, MASK, MaskSchedule(), block_size=4, generator=g) / 16
    empirical = -torch.log(p)[x0].mean().item()
    assert abs(nats.mean().item() - empirical) < 4 * nats.std().item() / math.sqrt(256)


def test_bad_block_sizes_and_mask_ranges_are_one_line_usage_errors():
    with pytest.raises(UsageProblem, match="does not divide"):
        check_block_size(5, 128)
    with pytest.raises(UsageProblem, match="inside"):
        BlockObjective(4, 16, (0.0, 0.5))
    assert BlockObjective(4, 16).mask_range == (0.45, 0.95) and BlockObjective(16, 64).mask_range == (0.3, 0.8)


@pytest.mark.parametrize("sampler", ["ancestral", "confidence", "margin", "remdm:0.1"])
@pytest.mark.parametrize("prompt_len,new", [(1, 13), (6, 20), (3, 45)])
def test_kv_cached_block_sampling_equals_uncached(sampler, prompt_len, new):
    """The cache of finished blocks (fused into each block's first call) changes nothing: same tokens, same calls;
    45 new tokens overflow the 32-position context, so the window restarts."""
    model, _ = _model()
    prompt = torch.randint(0, MASK, (2, prompt_len))
    runs = [generate_blocks(model, prompt, new, MASK, 4, context=32, steps=3, kv_cache=c, sampler=parse_sampler(sampler),
                            generator=torch.Generator().manual_seed(5)) for c in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and runs[0].nfe == runs[1].nfe
    out = runs[0].tokens
    assert out.shape == (2, prompt_len + new) and torch.equal(out[:, :prompt_len], prompt)
    assert not (out == MASK).any()
    assert model.max_seq_len == 0  # the cache is released


def test_sampler_network_calls():
    model, _ = _model()
    prompt = torch.randint(0, MASK, (1, 4))  # 32 new tokens: 8 blocks of 4
    nfe = {s: generate_blocks(model, prompt, 32, MASK, 4, context=64, steps=s_steps, sampler=parse_sampler(s),
                              generator=torch.Generator().manual_seed(0)).nfe
           for s, s_steps in (("confidence", 8), ("margin", 2), ("ancestral", 8), ("remdm:0.5", 8))}
    assert nfe["confidence"] == 8 * 4   # at most one call per mask: steps beyond the masks are skipped
    assert nfe["margin"] == 8 * 2
    assert nfe["ancestral"] < nfe["remdm:0.5"] <= 8 * 8  # remasked tokens are unmasked again: more calls
    runs = [generate_blocks(model, prompt, 32, MASK, 4, context=64, steps=8, sampler=parse_sampler(s),
                            generator=torch.Generator().manual_seed(0)) for s in ("ancestral", "remdm:0")]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and runs[0].nfe == runs[1].nfe  # eta 0: MDLM's sampler
    runs = [generate_blocks(model, prompt, 32, MASK, 4, context=64, steps=16, cache=c,
                            generator=torch.Generator().manual_seed(0)) for c in (True, False)]
    assert 8 <= runs[0].nfe <= 8 * 4 and runs[1].nfe == 8 * 16  # caching: a call only when something unmasks
    assert torch.equal(runs[0].tokens, runs[1].tokens)


@pytest.mark.parametrize("sampler", [Sampler("ancestral"), Sampler("remdm", 0.3)])
def test_ancestral_and_remdm_keep_the_data_distribution(sampler):
    """ReMDM's remasking leaves the marginals of the forward process intact: with an exact i.i.d. denoiser both
    samplers draw tokens with the data's frequencies (a chi-square test at a fixed seed)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(torch.cat([p, torch.full((V - 4,), 1e-30)]))
    z = torch.full((64, 32), MASK)
    out = denoise(lambda c: logits.expand(*c.shape, V), z, MASK, steps=16, sampler=sampler, cache=False,
                  generator=torch.Generator().manual_seed(3)).tokens
    counts = torch.bincount(out.flatten(), minlength=V)[:4].double()
    assert counts.sum() == out.numel()
    chi2 = (((counts - p * out.numel()) ** 2) / (p * out.numel())).sum().item()
    assert chi2 < 16.3, (chi2, counts)  # 99.9% quantile of chi-square with 3 degrees of freedom


@pytest.mark.parametrize("name", ["confidence", "margin"])
def test_confidence_samplers_unmask_the_surest_positions_first(name):
    """Position i's distribution sharpens with i: with one unmask per step the order must be N-1, ..., 0."""
    n = 6
    sharp = torch.stack([torch.tensor([1.0 + i, 0.0, 0.0, 0.0]) for i in range(n)])   # (N, 4) logits
    logits = torch.cat([sharp, torch.full((n, V - 4), -30.0)], dim=1)
    seen = []

    def f(c):
        seen.append(c.clone())
        return logits.expand(1, n, V)

    res = denoise(f, torch.full((1, n), MASK), MASK, steps=n, sampler=Sampler(name), temperature=0)
    seen.append(res.tokens)
    newly = [next(i for i in range(n) if seen[k + 1][0, i] != MASK and seen[k][0, i] == MASK) for k in range(n)]
    assert newly == [5, 4, 3, 2, 1, 0] and res.nfe == n
    assert torch.equal(res.tokens, torch.zeros(1, n, dtype=torch.long))  # temperature 0: the argmax


def test_parse_sampler_errors_are_one_line():
    assert parse_sampler(None) == Sampler("ancestral") and parse_sampler("remdm:0.05").eta == 0.05
    for bad in ("ddim", "confidence:3", "remdm:x", "remdm:2"):
        with pytest.raises(UsageProblem) as e:
            parse_sampler(bad)
        assert "\n" not in str(e.value)
