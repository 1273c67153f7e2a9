"""The whole-step CPU decoder (models/cpu_step.py, C++ in models/decode_src.py) against Transformer.forward.

Tolerance: with float32 activations the decoder computes the same float32 arithmetic as the model's forward pass
(RMSNorm, rotary, attention, SwiGLU; the quantized layers through the same kernel layouts) in another order, so
the logits differ by float32 rounding accumulated over the blocks: within 1e-4·max|logit| (measured ~1e-6 on
SmolLM2's 30 blocks, tests/models/test_quant_kernel_smollm2.py). Greedy tokens then agree."""

import pytest
import torch

from gentool.config import config_from_preset
from gentool.models import cpu_step, qkernel
from gentool.models.decode import fuse_projections, use_onednn_linears
from gentool.models.quant import quantize_model
from gentool.models.transformer import Transformer

pytestmark = pytest.mark.skipif(not qkernel.available(), reason="gentool's CPU kernel is unavailable here")
PROMPT = [1, 17, 42, 99, 7, 3, 250, 128]


@pytest.fixture(autouse=True)
def exact(monkeypatch):
    monkeypatch.setitem(qkernel._state, "act", 32)


def _model(scheme=None, *, bias=False, tied=False, heads=(4, 2)):
    cfg = config_from_preset("tiny", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=heads[0], num_key_value_heads=heads[1],
                             max_position_embeddings=96, attention_bias=bias, tie_word_embeddings=tied)
    model = Transformer(cfg)
    model.init_weights(0)
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.05)
    model.eval()
    if scheme in ("int8", "int4", "nf4"):
        quantize_model(model, scheme, group_size=64, skip=("embed_tokens",))
    elif scheme:
        from gentool.quantize.ggml import plan_for, quantize_model_ggml

        quantize_model_ggml(model, plan_for(model, cfg, scheme))
    return model


def _run(model, n, *, fast, every=1):
    """n greedy tokens after PROMPT and their logits; `fast`: the decoder for every `every`-th step, the model's
    forward for the others (both read and write the same cache)."""
    model.setup_cache(1, len(PROMPT) + n)
    ids, out = list(PROMPT), []
    with torch.no_grad():
        x = model(torch.tensor([PROMPT]), input_pos=torch.arange(len(PROMPT)))[:, -1]
        decoder = cpu_step.cpu_decoder(model) if fast else None
        assert decoder is not None or not fast
        for i in range(n):
            out.append(x[0])
            ids.append(int(x.argmax()))
            tok, pos = torch.tensor([ids[-1:]]), torch.tensor([len(ids) - 1])
            x = decoder.step(tok, pos) if fast and i % every == 0 else \
                model(tok, input_pos=pos)[:, -1]
    model.reset_cache()
    return ids[len(PROMPT):], torch.stack(out)


@pytest.mark.parametrize("scheme", [None, "int8", "int4", "nf4", "q4_0", "q4_k_m", "q6_k"])
@pytest.mark.parametrize("bias,tied,heads", [(False, False, (4, 2)), (True, True, (4, 4)), (False, True, (4, 1))])
def test_decoder_equals_the_forward_pass(scheme, bias, tied, heads):
    if bias and scheme and scheme.startswith("q"):
        pytest.skip("GGML schemes take Llama's bias-free layers")
    model = _model(scheme, bias=bias, tied=tied, heads=heads)
    ref_tokens, ref = _run(model, 24, fast=False)
    tokens, got = _run(model, 24, fast=True)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert tokens == ref_tokens


def test_decoder_and_forward_share_the_cache():
    model = _model("q4_0")
    ref_tokens, ref = _run(model, 20, fast=False)
    tokens, got = _run(model, 20, fast=True, every=2)  # alternate: each reads what the other wrote
    assert tokens == ref_tokens and (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_decoder_on_fused_and_onednn_projections():
    model = _model(None)
    ref_tokens, ref = _run(model, 16, fast=False)
    fuse_projections(model)
    use_onednn_linears(model)
    tokens, got = _run(model, 16, fast=True)
    assert tokens == ref_tokens and (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_models_the_decoder_does_not_take():
    from gentool.models.lora import LoRAConfig, inject_lora

    lora = _model(None)
    inject_lora(lora, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    bf16 = _model(None).to(torch.bfloat16)
    batch2 = _model("int8")
    for model, batch in [(lora, 1), (bf16, 1), (batch2, 2)]:
        model.setup_cache(batch, 32)
        assert cpu_step.cpu_decoder(model) is None
    assert cpu_step.cpu_decoder(_model(None)) is None  # no cache set up


def test_generator_uses_the_decoder_and_gives_the_same_text():
    from gentool.lm.sample import Generator, SamplingParams

    class Tok:
        bos_id, eos_id, pad_id, eos_ids, add_bos = None, None, 0, set(), False

        def decode(self, ids):
            return " ".join(map(str, ids))

    model = _model("q4_k_m")
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    fast = Generator(model, Tok(), device="cpu")
    a = fast.generate_ids([("", PROMPT)], params)[0]
    assert fast._cpu is not None
    slow = Generator(model, Tok(), device="cpu")
    slow.fast_cpu = False
    b = slow.generate_ids([("", PROMPT)], params)[0]
    assert slow._cpu is None
    assert a.token_ids == b.token_ids
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    other = PROMPT[::-1] + [5, 9]
    # the two Generators share the model, whose cache `slow` renewed: `fast` must decode over the current one
    a, b = (g.generate_ids([("", other)], sampled)[0].token_ids for g in (fast, slow))
    assert a == b



@pytest.mark.parametrize("scheme,tied,dtype,own_rows", [
    (None, False, torch.float32, True), ("int8", False, torch.bfloat16, True), ("q8_0", True, None, True),
    ("q4_k_m", True, None, True), ("q4_0", False, None, True), ("q6_k", False, None, False)])
def test_whole_tokens_in_cpp_equal_step_then_advance(scheme, tied, dtype, own_rows, monkeypatch):
    """Decoder.advance (input row, rotary angles, the step, the draw and DecodeState's bookkeeping in one C++ call)
    against Decoder.step + DecodeState.advance: the same tokens greedy and sampled (the same Gumbel noise; its
    logarithms from another library differ by ~1 ulp, far from this model's gaps between scores), log-probabilities
    within float32 rounding, and the same stop at an EOS."""
    from gentool.lm.sample import Generator, SamplingParams

    model = _model(scheme, tied=tied)
    if dtype is not None:  # a dense embedding table in another dtype (quantize keeps 16-bit tables)
        model.model.embed_tokens.to(dtype)
    emb = model.model.embed_tokens
    assert type(emb).__name__ == ("GGMLEmbedding" if scheme and scheme.startswith("q") else "Embedding")
    if not own_rows:  # an untied GGUF table above the copy's limit: its rows come from PyTorch
        monkeypatch.setattr(cpu_step, "EMBED_COPY_MAX", 0)
    model.setup_cache(1, 64)
    assert cpu_step.cpu_decoder(model).own_rows == own_rows

    def both(params, eos=None):
        class Tok:
            bos_id, eos_id, pad_id, eos_ids, add_bos = None, eos, 0, {eos} - {None}, False

            def decode(self, ids):
                return " ".join(map(str, ids))

        gen = Generator(model, Tok(), device="cpu")
        a = gen.generate_ids([("", PROMPT)], params)[0]
        decoder = gen._cpu[0]
        assert decoder.advances
        decoder.advances = False
        b = gen.generate_ids([("", PROMPT)], params)[0]
        assert a.token_ids == b.token_ids and a.stopped == b.stopped
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        return a

    first = both(SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    eos = first.token_ids[6]
    stopped = both(SamplingParams(max_new_tokens=20, temperature=0), eos=eos)
    assert stopped.stopped == "eos" and stopped.token_ids == first.token_ids[:first.token_ids.index(eos)]
    drawn = [both(SamplingParams(max_new_tokens=24, temperature=t, top_k=k, top_p=p, min_p=mp, seed=seed,
                                 ignore_eos=True)).token_ids
             for t, k, p, mp, seed in [(1.0, None, None, None, 0), (0.8, 5, None, None, 1), (1.3, None, 0.7, None, 2),
                                       (1.0, None, None, 0.2, 3), (0.9, 20, 0.9, 0.05, 4), (2.0, 3, 0.0, None, 5)]]
    assert len({tuple(d) for d in drawn}) > 3 and drawn[0] != first.token_ids  # the draws are draws


_OTHER_CPU = """
import torch, sys
sys.path.insert(0, {tests!r})
from gentool.models import qkernel
import test_cpu_step as t
assert qkernel.available() and qkernel._isa() == {isa!r}
assert torch.ops.gentool_qk.has_vnni() is False and qkernel.act_bits() == 32
for scheme in (None, "int4", "q4_k_m", "q6_k"):
    m = t._model(scheme)
    ref_tokens, ref = t._run(m, 12, fast=False)
    tokens, got = t._run(m, 12, fast=True)
    assert tokens == ref_tokens and (got - ref).abs().max() <= 1e-4 * ref.abs().max(), scheme
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_the_code_paths_of_cpus_without_vnni_or_avx512(isa, tmp_path):
    """The build for a CPU with less than this one (GENTOOL_CPU_ISA caps the instruction set) compiles, and its
    float32-activation decoder equals the forward pass."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not qkernel.ISAS[isa] <= set(Path("/proc/cpuinfo").read_text().split()):
        pytest.skip(f"this CPU lacks {isa}")
    env = {**os.environ, "GENTOOL_CPU_ISA": isa, "GENTOOL_KERNEL_DIR": str(tmp_path)}
    code = _OTHER_CPU.format(tests=str(Path(__file__).parent), isa=isa)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("vocab", [7, 4099, 49152])
def test_greedy_op_equals_argmax_and_log_softmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(4, vocab, generator=g) * 6
    x[1, vocab // 3] = x[1, vocab - 1] = 50.0          # a tie: the first index, as torch.argmax
    x[2, vocab // 2] = float("nan")                     # non-finite rows: NaN log-probs, as log_softmax gives
    x[3, 0] = float("inf")
    idx, logp = torch.ops.gentool_qk.greedy(x)
    ref = x.argmax(-1)
    assert idx.tolist() == ref.tolist()
    want = x.log_softmax(-1).gather(-1, ref[:, None])[:, 0]
    assert torch.allclose(logp[:2], want[:2], rtol=0, atol=1e-5) and bool(logp[2:].isnan().all())


def test_a_quantized_embedding_tied_to_the_head_reads_its_rows_from_the_head():
    model = _model("q8_0", tied=True)
    model.setup_cache(1, 16)
    decoder = cpu_step.cpu_decoder(model)
    assert decoder is not None and decoder.table.codes is model.lm_head._qk_codes  # the head's layout, no copy
    ids = torch.tensor([[0, 5, 255]])
    with torch.no_grad():
        want = model.model.embed_tokens(ids)[0]
        got = torch.stack([decoder.embed(ids[:, i:i + 1]) for i in range(3)])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7 * want.abs().max().item())
    ref_tokens, ref = _run(model, 12, fast=False)
    tokens, out = _run(model, 12, fast=True)
    assert tokens == ref_tokens and (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("done", [False, True])
def test_cpp_advance_writes_the_state_that_advance_writes(done):
    from gentool.lm.sample import DecodeState, SamplingParams

    model = _model("q4_0", tied=True)
    model.setup_cache(1, 32)
    decoder = cpu_step.cpu_decoder(model)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), input_pos=torch.arange(len(PROMPT)))
        choice = int(decoder.step(torch.tensor([[PROMPT[-1]]]), torch.tensor([len(PROMPT) - 1])).argmax())
    states = []
    for _ in range(2):
        s = DecodeState(1, 32, model.config.vocab_size, 1, "cpu")
        s.token.fill_(PROMPT[-1]), s.pos.fill_(len(PROMPT) - 1), s.count.fill_(3), s.fill.fill_(0)
        s.eos.fill_(choice)  # the choice is an EOS: done is set (or kept)
        s.done.fill_(done)
        states.append(s)
    decoder.advance(states[0], SamplingParams(temperature=0))
    states[1].advance(decoder.step(states[1].token, states[1].pos), SamplingParams(temperature=0))
    a, b = (dict(s.named_buffers()) for s in states)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    assert bool(a["done"]) and int(a["out"][0, 3]) == (0 if done else choice) and int(a["pos"]) == len(PROMPT)


def test_gguf_table_copy_made_once_per_weight():
    emb = _model("q4_0").model.embed_tokens
    first = cpu_step._table(emb)
    assert cpu_step._table(emb) is first  # a renewed decoder (another cache shape) reuses it
    with torch.no_grad():
        emb.weight[0].zero_()  # the weight changed in place: made again, from the new bytes
    again = cpu_step._table(emb)
    assert again is not first
    assert not (torch.equal(again.codes[0], first.codes[0]) and torch.equal(again.scale[0], first.scale[0]))
