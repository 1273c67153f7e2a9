"""Every CPU speed path of batch-1 decoding gives the reference path's tokens and log-probabilities: the traced
step (multiply-and-sum GEMV, fused int8 GEMV) against eager decoding, the specialised forward over quantized
layers against Transformer.forward, and the compiled (inductor) step against eager decoding."""

import pytest
import torch

from gentool.config import config_from_preset
from gentool.lm.sample import Generator, SamplingParams, decode_weight_bytes
from gentool.models.decode import decode_forward, gemv
from gentool.models.quant import quantize_model
from gentool.models.transformer import Transformer

PROMPT = [1, 17, 5, 99, 230, 8, 41]


class IdTok:
    """Prompts as ids; no text."""
    bos_id, eos_id, pad_id, eos_ids, add_bos = 1, 2, 0, {2}, True

    def decode(self, ids):
        return ""


def model(scheme=None, dtype=torch.float32, seed=0):
    cfg = config_from_preset("tiny", vocab_size=400, max_position_embeddings=96)
    m = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights: peaked distributions, greedy choices far from ties
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    if scheme:
        quantize_model(m, scheme, group_size=32, skip=("embed_tokens",))
    return m.to(dtype).eval()


def decode(m, compile, fuse=None, n=24):
    gen = Generator(m, IdTok(), device="cpu", compile=compile, fuse=fuse)
    out = gen.generate_ids([("", PROMPT)], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0]
    m.reset_cache()
    return out


@pytest.mark.parametrize("scheme,dtype", [(None, torch.float32), (None, torch.bfloat16), ("int8", torch.float32),
                                          ("int8", torch.bfloat16), ("int4", torch.bfloat16)])
def test_traced_step_equals_eager_decoding(scheme, dtype):
    """compile="eager" traces the step as torch.compile does (torch.compiler.is_compiling() is true), so the
    compiled-only code paths run and are compared with eager decoding on the same weights."""
    m = model(scheme, dtype)
    ref = decode(m, False)
    got = decode(m, "eager")
    assert got.token_ids == ref.token_ids
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert got.logprobs == pytest.approx(ref.logprobs, abs=tol)


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_decode_forward_over_quantized_layers_equals_general_forward(scheme):
    m = model(scheme)
    fused = decode(m, False, fuse=True)
    general = decode(m, False, fuse=False)
    assert fused.token_ids == general.token_ids
    assert fused.logprobs == pytest.approx(general.logprobs, abs=1e-5)


def test_gemv_under_tracing_matches_linear():
    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 96), torch.randn(200, 96)
    traced = torch.compile(gemv, backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()  # bfloat16 weights, float32 accumulation
    torch.testing.assert_close(traced(xb, wb).float(), (x.bfloat16().float() @ wb.float().T), rtol=1e-2, atol=1e-2)
    x8 = torch.randn(8, 1, 96)  # more rows than a GEMV: F.linear
    torch.testing.assert_close(traced(x8, w), torch.nn.functional.linear(x8, w))


def test_decode_weight_bytes_counts_quantized_codes():
    m = model()
    dense = decode_weight_bytes(m)
    q = model("int8")
    # every linear is int8 (1 byte + a 4-byte scale per row) instead of 4 bytes; norms stay float32
    lin = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    want = dense - sum(4 * l.weight.numel() for l in lin) + sum(l.weight.numel() + 4 * l.out_features for l in lin)
    assert decode_weight_bytes(q) == want


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_inductor_step_equals_eager_decoding(scheme):
    m = model(scheme, seed=1)
    ref = decode(m, False)
    got = decode(m, True)
    assert got.token_ids == ref.token_ids
    assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_inductor_bfloat16_logits_close_to_eager(scheme):
    """In bfloat16 inductor keeps fused intermediates in float32 where eager rounds every op to bfloat16, so long
    greedy runs may part at a near-tie: compare one step's logits instead."""
    m = model(scheme, torch.bfloat16, seed=2)
    ids = torch.tensor([PROMPT])
    m.setup_cache(1, 32)
    m(ids[:, :-1], input_pos=torch.arange(len(PROMPT) - 1))
    args = (ids[:, -1:], torch.tensor([len(PROMPT) - 1]))
    ref = decode_forward(m, *args).float()
    got = torch.compile(decode_forward, fullgraph=True)(m, *args).float()
    torch.testing.assert_close(got, ref, rtol=0.03, atol=0.03 * ref.abs().max().item())


def test_fused_decode_forward_logits_equal_forward_with_quantized_layers():
    m = model("int8")
    m.setup_cache(1, 32)
    ids = torch.tensor([PROMPT])
    full = m(ids)[:, -1]
    m.setup_cache(1, 32)
    m(ids[:, :-1], input_pos=torch.arange(len(PROMPT) - 1))
    one = decode_forward(m, ids[:, -1:], torch.tensor([len(PROMPT) - 1]))
    torch.testing.assert_close(one, full, rtol=1e-5, atol=1e-5)


def test_prompt_lookup_drafts_from_the_latest_occurrence():
    from gentool.lm.sample import PromptLookup

    p = PromptLookup([5, 6, 7, 8, 5, 6, 9, 1, 5, 6])
    assert p.draft(3) == [9, 1, 5]  # the latest "5 6" was followed by 9 (the 3-gram "1 5 6" never occurred)
    p.extend([9])
    assert p.draft(2) == [1, 5]     # "5 6 9" occurred before, followed by 1
    assert PromptLookup([1, 2, 3]).draft(4) == [] and PromptLookup([]).draft(2) == []
    q = PromptLookup([4, 4, 4])
    assert q.draft(5) == [4]        # "4 4" last seen ending at index 1, followed by one 4


@pytest.mark.parametrize("scheme", [None, "int8"])
@pytest.mark.parametrize("residual", [1.0, 0.0])
def test_prompt_lookup_decoding_equals_greedy(scheme, residual, monkeypatch):
    """residual 1: a random model, whose drafts are mostly rejected (the cache past the kept tokens must not leak
    into later steps); residual 0: attention and MLP outputs zeroed, so the next token is a function of the current
    one and greedy decoding falls into a cycle that the drafts predict. Float32 activations in the quantized
    layers: the drafts are checked by a multi-token pass (float32), the plain steps decode one token (8-bit
    activations where the CPU has VNNI), whose logprobs differ by that rounding, not by 1e-4."""
    from gentool.models import qkernel

    monkeypatch.setitem(qkernel._state, "act", 32)
    m = model()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(residual)
    if scheme:
        quantize_model(m, scheme, skip=("embed_tokens",))
    plain = Generator(m, IdTok(), device="cpu")
    fast = Generator(m, IdTok(), device="cpu", prompt_lookup=5)
    accepted = 0
    for prompt in (PROMPT, PROMPT * 3, [1] + [7, 8, 9] * 6):
        params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
        ref = plain.generate_ids([("", prompt)], params)[0]
        got = fast.generate_ids([("", prompt)], params)[0]
        assert got.token_ids == ref.token_ids
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
        accepted += fast.stats["draft_tokens_accepted"]
    assert accepted > (10 if residual == 0 else -1)


def test_cli_prompt_lookup_same_text(tmp_path, cli):
    import io
    import json

    import sentencepiece as spm

    from gentool.data.text import bundled_corpus
    from gentool.models.checkpoint import save_lm

    m = model()
    (tmp_path / "lm").mkdir()
    save_lm(m, m.config, tmp_path / "lm")
    buf = io.BytesIO()  # a tokenizer whose ids fit the tiny model
    text = (bundled_corpus() / "tragedies" / "hamlet.txt").read_text()[:100_000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()),
                                   model_writer=buf, vocab_size=400, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, minloglevel=2, num_threads=1)
    (tmp_path / "lm" / "tokenizer.model").write_bytes(buf.getvalue())
    args = ("sample", tmp_path / "lm", "-p", "to be", "--temperature", "0", "--max-new-tokens", "30", "--json",
            "--device", "cpu")
    plain, fast = cli(*args), cli(*args, "--prompt-lookup", "4")
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    a, b = json.loads(plain.stdout), json.loads(fast.stdout)
    assert (a["completion"], a["tokens"]) == (b["completion"], b["tokens"])
    assert b["sum_logprob"] == pytest.approx(a["sum_logprob"], abs=1e-3)
    assert cli(*args, "--prompt-lookup", "-1").exit_code == 2


def test_onednn_linears_same_outputs_state_dict_and_gradients():
    from gentool.models.decode import OneDNNLinear, use_onednn_linears

    m = model()
    x = torch.randint(0, 400, (2, 12))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(x)
        use_onednn_linears(m)
        got = m(x)
    assert isinstance(m.lm_head, OneDNNLinear) and isinstance(m.model.layers[0].mlp.up_proj, OneDNNLinear)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    m(x).logsumexp(-1).mean().backward()  # with gradients: plain F.linear, autograd intact
    assert m.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_packed_weights_same_products_follow_weight_changes_and_respect_memory(monkeypatch):
    from gentool.models import decode as dec

    m = model()
    dec.use_onednn_linears(m)
    x = torch.randn(1, 20, m.config.hidden_size)  # ≥ PACKED_MIN_ROWS rows: the packed copy
    lin = m.model.layers[0].mlp.up_proj
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight)
        assert dec.pack_weights(m.model)
        assert "packed" in lin.__dict__ and "packed" not in m.lm_head.__dict__
        copy = lin.__dict__["packed"]
        assert dec.pack_weights(m.model) and lin.__dict__["packed"] is copy  # packed once per weight
        # float32 summation order only: |error| ≤ K·eps·Σ|x||w|
        bound = 64 * torch.finfo(torch.float32).eps * (x.abs() @ lin.weight.abs().T)
        assert ((lin(x) - ref).abs() <= bound).all()
        lin.weight.mul_(2)  # changed in place: the stale copy is dropped, the product follows the new weight
        assert ((lin(x) - 2 * ref).abs() <= 2 * bound).all() and "packed" not in lin.__dict__
        assert ((lin(x[:, :3]) - 2 * ref[:, :3]).abs() <= 2 * bound[:, :3]).all()  # few rows: the plain weight
    fresh = model()
    dec.use_onednn_linears(fresh)
    monkeypatch.setattr(dec, "_available_memory", lambda: 1000)  # no room for a second copy: nothing packed
    assert not dec.pack_weights(fresh.model)
    assert not any("packed" in mod.__dict__ for mod in fresh.modules())


def test_prompt_from_position_zero_attends_over_its_own_keys_as_the_masked_cache_path_does():
    m = model()
    x = torch.randint(0, 400, (2, 11))
    with torch.no_grad():
        m.setup_cache(2, 32)
        masked = m.hidden_states(x, input_pos=torch.arange(11))  # positions given: the mask over the cache
        k_masked = m.model.layers[1].self_attn.kv_cache.k.clone()
        m.setup_cache(2, 32)
        fast = m.hidden_states(x)  # positions 0..10 implied: causal attention over the new keys
        k_fast = m.model.layers[1].self_attn.kv_cache.k.clone()
        m.reset_cache()
        plain = m.hidden_states(x)
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_fast, k_masked, rtol=1e-5, atol=1e-5)  # the cache written the same
