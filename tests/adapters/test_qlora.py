"""QLoRA end to end: LoRA trained on an NF4 / int4 / int8 quantized-checkpoint, merged back 16-bit or re-quantized
with a damage report, and the memory property that makes it QLoRA (no dense copy of a frozen weight is kept for
backward)."""

import json

import pytest
import torch

from gentool.models.lora import LoRALinear
from gentool.models.quant import LAYERS

ARGS = ["--preset", "tiny", "--seq-len", "32", "--micro-batch", "4", "--device", "cpu", "--lr", "1e-2",
        "--eval-tokens", "256"]


@pytest.mark.parametrize("scheme", ["nf4", "int4", "int8"])
def test_lora_on_a_quantized_layer_gets_the_dense_gradients_and_keeps_no_dense_weight(scheme):
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64, bias=False)
    q = LAYERS[scheme].from_linear(dense, 64)
    w = q.dequantize(torch.float32)
    lora_q = LoRALinear(q, 4, 8)
    torch.nn.init.normal_(lora_q.lora_B.weight)
    ref = torch.nn.Linear(128, 64, bias=False)
    ref.weight.data.copy_(w)
    lora_d = LoRALinear(ref, 4, 8)
    lora_d.load_state_dict({k.replace("base_layer.", "base_layer."): v for k, v in lora_q.state_dict().items()
                            if "lora_" in k}, strict=False)
    x1 = torch.randn(3, 5, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y1 = lora_q(x1)
    y2 = lora_d(x2)
    (y1.square().sum()).backward()
    (y2.square().sum()).backward()
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(lora_q, name).weight.grad, getattr(lora_d, name).weight.grad,
                                   rtol=1e-4, atol=1e-4)
    assert (64, 128) not in saved and (128, 64) not in saved, saved  # the frozen weight is rebuilt, not kept


def test_nf4_layer_dequantizes_bit_for_bit_like_the_codec():
    from gentool.codecs.quant import dequantize_nf4

    torch.manual_seed(0)
    for shape in ((96, 192), (1056, 1024)):  # the second spans several dequantization chunks
        q = LAYERS["nf4"].from_linear(torch.nn.Linear(shape[1], shape[0], bias=False))
        assert torch.equal(q.dequantize(torch.float32), dequantize_nf4(q.stored()))
        assert torch.equal(q.to(torch.bfloat16).dequantize(), dequantize_nf4(q.stored()).to(torch.bfloat16))


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, tiny_tokens):
    from typer.testing import CliRunner

    from gentool.cli import app

    def cli(*a):
        r = CliRunner().invoke(app, [str(x) for x in a])
        assert r.exit_code == 0, r.output
        return r

    d = tmp_path_factory.mktemp("qlora")
    cli("train-lm", tiny_tokens, "-o", d / "base", "--steps", "4", *ARGS)
    cli("quantize", d / "base", "--scheme", "nf4", "-o", d / "nf4")
    cli("train-lm", tiny_tokens, "-o", d / "ad", "--init-from", d / "nf4", "--lora-rank", "4", "--steps", "8",
        "--lora-targets", "q_proj,v_proj,up_proj", *ARGS)
    return d, tiny_tokens


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


def test_adapter_records_the_quantized_base(qlora):
    d, _ = qlora
    man = json.loads((d / "ad" / "manifest.json").read_text())
    nf4 = json.loads((d / "nf4" / "manifest.json").read_text())
    base = json.loads((d / "base" / "manifest.json").read_text())
    c = man["contents"]
    assert c["base_id"] == nf4["id"] and c["base_kind"] == "quantized-checkpoint"
    assert c["base_quantization"]["scheme"] == "nf4" and c["base_quantized_from"]["id"] == base["id"]
    assert [i["format"] for i in man["inputs"] if i["role"] == "base"] == ["gentool.quantized-checkpoint"]


def test_merge_onto_the_quantized_base_is_16bit_and_equals_the_unmerged_adapter(qlora, cli, tmp_path):
    from gentool.adapters import attach_adapter
    from gentool.models.checkpoint import load_lm

    d, _ = qlora
    r = cli("lora-merge", d / "nf4", d / "ad", "-o", tmp_path / "m", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "lm-checkpoint" and out["dtype"] == "bfloat16"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    ref = load_lm(d / "nf4")
    attach_adapter(ref.model, d / "nf4", d / "ad")
    ids = torch.randint(0, 400, (2, 24))
    merged = load_lm(tmp_path / "m")
    got, want = _logits(merged.model, ids), _logits(ref.model, ids)
    # the only difference is bfloat16 rounding of the merged weights
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    f32 = cli("lora-merge", d / "nf4", d / "ad", "-o", tmp_path / "m32", "--dtype", "float32")
    assert f32.exit_code == 0
    torch.testing.assert_close(_logits(load_lm(tmp_path / "m32").model, ids), want, rtol=1e-4, atol=1e-4)


def test_requantize_reports_the_damage_against_the_unmerged_adapter(qlora, cli, tmp_path):
    d, tokens = qlora
    args = ["--eval", tokens, "--max-tokens", "1500", "--window", "32", "--json"]
    r = cli("lora-merge", d / "nf4", d / "ad", "-o", tmp_path / "q", "--requantize", *args)
    assert r.exit_code == 0, r.output
    q = json.loads(r.stdout)
    r16 = cli("lora-merge", d / "nf4", d / "ad", "-o", tmp_path / "h", *args)
    h = json.loads(r16.stdout)
    assert q["kind"] == "quantized-checkpoint" and q["scheme"] == "nf4"
    assert q["reference"] == h["reference"] == "base + adapter (unmerged)"
    assert q["tokens"] == h["tokens"] > 1000
    # re-quantizing the merge costs more than 16-bit rounding, whose KL is at float32 noise here (either sign)
    assert abs(h["kl_mean"]) < 0.1 * q["kl_mean"]
    assert q["top1_agreement"] <= h["top1_agreement"] and h["top1_agreement"] > 0.97
    assert abs(h["delta_ppl_pct"]) < abs(q["delta_ppl_pct"]) + 0.5
    man = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert man["format"] == "gentool.quantized-checkpoint" and man["metrics"]["kl_mean"] == q["kl_mean"]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["scheme"] == "nf4"
    # the output head is re-quantized in the base's own scheme for it (int8); no adapter touched it: same codes
    assert cfg["quantization_config"]["module_schemes"] == {"lm_head": "int8"}
    from gentool.models.checkpoint import load_lm

    assert torch.equal(load_lm(tmp_path / "q").model.lm_head.weight, load_lm(d / "nf4").model.lm_head.weight)
    ppl = cli("perplexity", tmp_path / "q", tokens, "--json", "--device", "cpu", "--max-tokens", "500")
    assert ppl.exit_code == 0, ppl.output


def test_qlora_adapter_on_sample_perplexity_and_the_16bit_original(qlora, cli, tmp_path):
    d, tokens = qlora
    r = cli("perplexity", d / "nf4", tokens, "--adapter", d / "ad", "--json", "--device", "cpu", "--max-tokens", "500")
    assert r.exit_code == 0, r.output
    r = cli("lora-merge", d / "base", d / "ad", "-o", tmp_path / "orig")  # the original the NF4 base came from
    assert r.exit_code == 0 and "quantized copy of this base" in r.stderr


def test_qlora_refusals(qlora, cli, tmp_path):
    d, tokens = qlora
    r = cli("train-lm", tokens, "-o", tmp_path / "full", "--init-from", d / "nf4", "--steps", "2", *ARGS)
    assert r.exit_code == 2 and "cannot be fine-tuned in full" in r.stderr and "--lora-rank" in r.stderr
    r = cli("lora-merge", d / "base", d / "ad", "-o", tmp_path / "x", "--requantize")
    assert r.exit_code == 2 and "--requantize applies to a quantized base" in r.stderr
    r = cli("lora-merge", d / "base", d / "nf4", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "quantized checkpoint cannot be merged as a fine-tune" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "full").exists()
