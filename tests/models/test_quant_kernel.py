"""gentool's CPU kernel for quantized layers (models/qkernel.py) against the dequantized reference, per format.

Tolerance: the kernel multiplies the same float32 weights (code·scale + offset) by the same float32 activations as
x·dequant(W)ᵀ, in another order, so the difference is float32 summation rounding: within 2e-5·(|x|·|W|ᵀ) per output
(√K·2⁻²⁴ is about 2e-6 for K = 1536; the bound leaves room for unlucky orders). Greedy tokens then equal the
reference's: a near-tie within 1e-5 of the logits is what it would take to flip one."""

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


def _close(y, x, w):
    bound = 2e-5 * (x.abs().double() @ w.abs().double().T) + 1e-30
    return bool(((y.double() - x.double() @ w.double().T).abs() <= bound).all())


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
