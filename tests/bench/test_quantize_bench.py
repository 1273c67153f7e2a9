"""bench/quantize.py's GGML variants (the CUDA rows of bench/gpu.sh): the layers and types `quantize --scheme MIX`
would give, bytes that are real blocks of the weight's first rows repeated, and the kernel each layer runs on."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gentool.codecs import ggml
from gentool.models import qkernel
from gentool.models.quant_ggml import GGMLLinear
from gentool.quantize.ggml import plan_for

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_bench():
    """bench/quantize.py under its own name (not `quantize`), with bench/ on the path only while it imports."""
    spec = importlib.util.spec_from_file_location("gentool_bench_quantize", BENCH / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


qbench = _load_bench()


@pytest.mark.parametrize("mix", ["q4_0", "q4_k_m"])
def test_ggml_variant_has_the_mix_types_and_real_blocks(mix):
    torch.manual_seed(0)
    model = qbench.build("mini", "cpu", torch.float32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    types = plan_for(model, model.config, mix)
    qbench.ggml_variant(model, mix, torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert layers and all(types[f"{n}.weight"] == m.qtype for n, m in layers.items())
    first = {}  # (shape, type) -> the first tensor of it: its rows are the ones quantized
    for key, qtype in types.items():
        first.setdefault((tuple(weights[key].shape), qtype), key)
    for name, layer in layers.items():
        w, raw = weights[f"{name}.weight"], layer.weight
        rows = min(qbench.GGML_ROWS, w.shape[0])
        source = weights[first[(tuple(w.shape), layer.qtype)]][:rows]
        assert torch.equal(raw[:rows], torch.from_numpy(ggml.quantize(source.numpy(), layer.qtype)))
        assert torch.equal(raw, raw[:rows].repeat(-(-w.shape[0] // rows), 1)[:w.shape[0]])
    logits = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()
    want = "gentool CPU kernel" if qkernel.available() else "dequantized once at load (dense)"
    assert qbench.kernel_path(model).startswith(want)
    assert qbench.kernel_path(qbench.build("tiny", "cpu", torch.float32)) == "dense"
