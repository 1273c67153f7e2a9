"""GGML block layers: decoding equals the numpy codecs (themselves bit-exact with ggml) bit for bit, the layers
compute x·Wᵀ with that W on every kernel path, and moving or casting a layer never touches its bytes."""

import numpy as np
import pytest
import torch

from gentool.codecs import ggml
from gentool.models import qkernel, quant_ggml as qg
from gentool.models.quant_ggml import GGMLEmbedding, GGMLLinear, dequantize_bytes, ggml_activations

TYPES = qg.SUPPORTED


def _weights(rows=48, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.random((1, cols)).astype(np.float32) * 3
    w[5] = 0  # an all-zero row
    w[7, :32] *= 100  # an outlier block
    return w


@pytest.mark.parametrize("qtype", TYPES + ("F16", "F32"))
def test_decoding_equals_codec_bit_for_bit(qtype):
    w = _weights()
    raw = ggml.quantize(w, qtype)
    ref = ggml.dequantize(raw, qtype, w.shape[1])
    got = dequantize_bytes(torch.from_numpy(raw), qtype, w.shape[1]).numpy()
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("kernel", ["gentool", "dense", "int4"])
def test_linear_computes_with_the_decoded_weight(qtype, kernel, monkeypatch):
    if kernel != "gentool":  # the fallbacks where gentool's CPU kernel is unavailable
        monkeypatch.setattr(qkernel, "ENABLED", False)
        monkeypatch.setattr(qg, "GGML_CPU_KERNEL", kernel)
    w = _weights()
    raw = torch.from_numpy(ggml.quantize(w, qtype))
    bias = torch.randn(48)
    layer = GGMLLinear(512, 48, raw, qtype, bias)
    assert (layer._qk_codes is not None) == (kernel == "gentool" and qkernel.available())
    if kernel == "int4" and qtype not in ("Q6_K", "Q2_K", "Q3_K"):  # group-32 types: Int4Linear on nibble planes
        assert len(layer._kernels) == (1 if qtype in ("Q4_0", "Q4_1", "Q4_K") else 2)
    x = torch.randn(3, 5, 512)
    ref = x @ torch.from_numpy(ggml.dequantize(raw.numpy(), qtype, 512)).T + bias
    got = layer(x)
    assert got.shape == (3, 5, 48)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())
    assert set(layer.state_dict()) == {"weight", "bias"} and torch.equal(layer.state_dict()["weight"], raw)


def test_cast_and_move_keep_bytes_and_change_compute_dtype():
    raw = torch.from_numpy(ggml.quantize(_weights(), "Q4_K"))
    layer = GGMLLinear(512, 48, raw.clone(), "Q4_K").to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, raw)
    assert layer(torch.randn(2, 512, dtype=torch.bfloat16)).dtype == torch.bfloat16
    emb = GGMLEmbedding(48, 512, raw.clone(), "Q4_K").to(torch.float16)
    assert torch.equal(emb.weight, raw)
    ids = torch.tensor([[0, 7, 47], [5, 5, 1]])
    full = dequantize_bytes(raw, "Q4_K", 512)
    assert torch.equal(emb(ids), full[ids].half())


def test_grad_flows_to_the_input():  # LoRA on a GGML base: the dequantize path carries gradients
    raw = torch.from_numpy(ggml.quantize(_weights(), "Q5_K"))
    layer = GGMLLinear(512, 48, raw, "Q5_K")
    x = torch.randn(2, 512, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantize().sum(0).expand(2, -1), atol=1e-4)


def test_llama_cpp_activation_rounding():
    """Q8_0 for 32-weight types (d = fp16(amax/127), codes round(x·127/amax) half to even), Q8_K for K-quants
    (d = 1/iscale, iscale = -127/max of the signed largest value) — checked against a naive per-block loop."""
    x = torch.randn(2, 512) * 3
    x[0, 3] = 40.0
    for qtype, block in (("Q4_0", 32), ("Q4_K", 256)):
        got = ggml_activations(x, qtype)
        for r in range(2):
            for b0 in range(0, 512, block):
                v = x[r, b0:b0 + block].double()
                if block == 32:
                    amax = v.abs().max()
                    q = torch.round(v.float() * (127.0 / amax.float()))
                    d = torch.tensor(float(amax) / 127, dtype=torch.float32).half().float()
                else:
                    mx = v[v.abs().argmax()].float()
                    iscale = -127.0 / mx
                    q = torch.round(iscale * v.float()).clamp(max=127)
                    d = 1 / iscale
                assert torch.equal(got[r, b0:b0 + block], q * d)
        assert (got - x).abs().max() < x.abs().max() / 100
