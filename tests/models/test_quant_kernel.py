"""gentool's CPU kernel for quantized layers (models/qkernel.py) against the dequantized reference, per format.

Tolerance, float32 activations (act 32): the kernel multiplies the same float32 weights (code·scale + offset) by the
same float32 activations as x·dequant(W)ᵀ, in another order, so the difference is float32 summation rounding:
within 2e-5·(|x|·|W|ᵀ) per output (√K·2⁻²⁴ is about 2e-6 for K = 1536; the bound leaves room for unlucky orders).
Greedy tokens then equal the reference's: a near-tie within 1e-5 of the logits is what it would take to flip one.

8-bit activations (act 8, CPUs with AVX-512 VNNI): x is rounded per run of 4 values, x ≈ q·d with |x - q·d| ≤ d/2,
so each output is within ½·Σ_runs d_r·Σ_{k in r} |w[n, k]| of x·dequant(W)ᵀ (plus the float32 rounding above); and
it equals Q8(x)·dequant(W)ᵀ, computed here independently in float64, up to that float32 rounding."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gentool.codecs import ggml
from gentool.config import config_from_preset
from gentool.models import qkernel
from gentool.models.quant import LAYERS, dequantize_model
from gentool.models.quant_ggml import SUPPORTED, GGMLLinear, dequantize_embeddings
from gentool.models.transformer import Transformer

needs_kernel = pytest.mark.skipif(not qkernel.available(), reason="gentool's CPU kernel is unavailable here")
needs_vnni = pytest.mark.skipif(not (qkernel.available() and torch.ops.gentool_qk.has_vnni()),
                                reason="8-bit activations need AVX-512 VNNI")


@pytest.fixture(autouse=True)
def exact(monkeypatch):
    """Float32 activations unless a test asks for 8-bit ones."""
    monkeypatch.setitem(qkernel._state, "act", 32)


def _close(y, x, w):
    bound = 2e-5 * (x.abs().double() @ w.abs().double().T) + 1e-30
    return bool(((y.double() - x.double() @ w.double().T).abs() <= bound).all())


def _q8(x):
    """x rounded as the kernel's 8-bit activations: per run of 4, d = max|x|/127, q = round(x·127/max|x|)."""
    b = x.float().reshape(x.shape[0], -1, 4)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127.0)).reshape(x.shape), (amax / 127.0)[..., 0]


def _close_int8(y, x, w):
    xq, d = _q8(x)
    w = w.double()
    exact = xq.double() @ w.T
    # float32 rounding of the kernel's terms: relative to |x|·|W|, and a floor for rows whose terms cancel (an
    # all-zero int4 row is 0·scale + offset with offset = 0 only up to rounding)
    rounding = 2e-5 * (xq.abs().double() @ w.abs().T) + 1e-6 * exact.abs().max()
    same_arithmetic = (y.double() - exact).abs() <= rounding
    runs = w.abs().reshape(w.shape[0], -1, 4).sum(-1)                      # (N, K/4)
    within_bound = (y.double() - x.double() @ w.T).abs() <= 0.5 * d.double() @ runs.T + rounding
    return bool(same_arithmetic.all()) and bool(within_bound.all())


def _weights(n=48, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(1, k, generator=g) * 3
    w[5] = 0
    w[7, :32] *= 100
    return w


@needs_kernel
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("nf4", None)])
@pytest.mark.parametrize("rows", [1, 3, 9])  # decode (1-4 rows: one pass over the codes) and prefill (tiles)
def test_gentool_formats_match_dequantized_reference(scheme, group, rows):
    layer = LAYERS[scheme].from_linear(torch.nn.Linear(512, 48, bias=False), group or 128)
    assert layer._qk_codes is not None
    x = torch.randn(rows, 512)
    assert _close(layer(x), x, layer.dequantize(torch.float32))


@needs_kernel
@pytest.mark.parametrize("qtype", SUPPORTED)
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_ggml_types_match_dequantized_reference(qtype, rows):
    w = _weights()
    layer = GGMLLinear(512, 48, torch.from_numpy(ggml.quantize(w.numpy(), qtype)), qtype)
    assert layer._qk_codes is not None and layer._packed is None  # no dense weight kept
    x = torch.randn(rows, 512)
    assert _close(layer(x), x, layer.dequantize(torch.float32))


def _int8_cases():
    w = _weights(48, 512)
    lin = torch.nn.Linear(512, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    for scheme, group in [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]:
        yield f"{scheme}{group or ''}", lambda s=scheme, g=group: LAYERS[s].from_linear(lin, g or 128)
    for qtype in SUPPORTED:
        yield qtype, lambda t=qtype: GGMLLinear(512, 48, torch.from_numpy(ggml.quantize(w.numpy(), t)), t)


@needs_vnni
@pytest.mark.parametrize("make", [m for _, m in _int8_cases()], ids=[n for n, _ in _int8_cases()])
@pytest.mark.parametrize("rows", [1, 4])
def test_8bit_activations_within_their_rounding_bound(monkeypatch, make, rows):
    monkeypatch.setitem(qkernel._state, "act", 8)
    layer = make()
    x = torch.randn(rows, 512) * torch.rand(1, 512) * 2
    x[0, 100] = 40.0  # an outlier: it coarsens only its own run of 4
    w = layer.dequantize(torch.float32)
    y = layer(x) - (layer.bias if layer.bias is not None else 0)
    assert _close_int8(y, x, w)
    assert not _close(y, x, w)  # the activations really were rounded


@needs_vnni
def test_8bit_activations_leave_tables_and_prefill_in_float32(monkeypatch):
    monkeypatch.setitem(qkernel._state, "act", 8)
    nf4 = LAYERS["nf4"].from_linear(torch.nn.Linear(512, 48, bias=False))
    x = torch.randn(1, 512)
    assert _close(nf4(x), x, nf4.dequantize(torch.float32))  # NF4's float table: no integer codes
    q4 = GGMLLinear(512, 48, torch.from_numpy(ggml.quantize(_weights().numpy(), "Q4_0")), "Q4_0")
    x = torch.randn(9, 512)  # more than 4 rows: prefill, float32
    assert _close(q4(x), x, q4.dequantize(torch.float32))


def _greedy(model, prompt, n):
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    return ids[0, prompt.shape[1]:].tolist()


@needs_kernel
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "q4_k_m", "q8_0", "q4_0"])
def test_greedy_tokens_equal_the_dequantized_reference(scheme):
    from gentool.quantize.ggml import plan_for, quantize_model_ggml
    from gentool.models.quant import quantize_model

    cfg = config_from_preset("tiny", vocab_size=256, hidden_size=256, intermediate_size=512,
                             max_position_embeddings=80)
    model = Transformer(cfg)
    model.init_weights(0)
    model.eval()
    if scheme in ("int8", "int4", "nf4"):
        quantize_model(model, scheme, group_size=64, skip=("embed_tokens",))
    else:
        quantize_model_ggml(model, plan_for(model, cfg, scheme))
    assert any(getattr(m, "_qk_codes", None) is not None for m in model.modules())
    ref = dequantize_embeddings(dequantize_model(copy.deepcopy(model)))
    prompt = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 128]])
    with torch.no_grad():
        a, b = model(prompt), ref(prompt)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert _greedy(model, prompt, 64) == _greedy(ref, prompt, 64)


def test_fallback_without_the_kernel_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(qkernel, "_isa", lambda: None)  # a CPU without AVX2/FMA
    monkeypatch.setattr(qkernel, "_state", {})
    lin = torch.nn.Linear(64, 16, bias=True)
    layers = [LAYERS[s].from_linear(lin, 32) for s in ("int8", "int4", "nf4")]
    layers.append(GGMLLinear(256, 16, torch.from_numpy(ggml.quantize(_weights(16, 256).numpy(), "Q4_K")), "Q4_K"))
    err = capsys.readouterr().err
    assert err.count("unavailable") == 1 and "AVX2" in err
    for layer in layers:
        assert layer._qk_codes is None
        x = torch.randn(3, layer.in_features)
        ref = F.linear(x, layer.dequantize(torch.float32), layer.bias)
        assert torch.allclose(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_layout_refuses_shapes_the_kernel_does_not_take():
    codes = torch.zeros(4, 48, dtype=torch.uint8)
    assert qkernel.layout(codes, torch.ones(4, 1), None, 4) is None  # 4-bit needs groups of 32
    assert qkernel.layout(codes.to(torch.int8), torch.ones(4, 3), None, 8) is not None  # 8-bit: groups of 16
    packed = qkernel.pack_nibbles(torch.arange(32, dtype=torch.uint8)[None] % 16)
    assert packed.tolist() == [[j | (j << 4) for j in range(16)]]
    assert np.array_equal(packed.shape, (1, 16))


@needs_vnni
@pytest.mark.parametrize("k", [576, 640])  # 576 = 4.5 chunks of 128 weights: a 64-weight tail
@pytest.mark.parametrize("kind", ["int4-32", "int4-64", "int4-128", "Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_8bit_activations_at_widths_that_end_in_half_a_chunk(monkeypatch, k, kind):
    monkeypatch.setitem(qkernel._state, "act", 8)
    w = _weights(40, k, seed=1)
    if kind.startswith("int4"):
        group = int(kind.split("-")[1])
        if k % group:
            pytest.skip(f"group {group} does not divide {k}")
        lin = torch.nn.Linear(k, 40, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        layer = LAYERS["int4"].from_linear(lin, group)
    else:
        layer = GGMLLinear(k, 40, torch.from_numpy(ggml.quantize(w.numpy(), kind)), kind)
    x = torch.randn(2, k)
    assert _close_int8(layer(x), x, layer.dequantize(torch.float32))


def test_activation_bits_switches_and_restores(monkeypatch):
    monkeypatch.setitem(qkernel._state, "act", 8)
    with qkernel.activation_bits(32):
        assert qkernel.act_bits() == 32
        with qkernel.activation_bits(8):
            assert qkernel.act_bits() == 8
        assert qkernel.act_bits() == 32
    assert qkernel.act_bits() == 8
    monkeypatch.delitem(qkernel._state, "act")
    with pytest.raises(RuntimeError), qkernel.activation_bits(32):  # restored (unset) after an error too
        raise RuntimeError
    assert "act" not in qkernel._state
    with pytest.raises(ValueError):
        with qkernel.activation_bits(16):
            pass
