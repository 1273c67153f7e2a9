"""The output head of gentool's schemes (issue 28): int8/int4/nf4 store `lm_head` as int8 by default (as
llama-quantize keeps output.weight at higher precision), the input embedding stays 16-bit; --output-tensor-type
picks the head's format, --skip lm_head / --output-tensor-type float keep the old 16-bit head."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gentool.models.checkpoint import load_lm
from gentool.models.quant import Int8Linear, QuantLinear, quantize_model

_spec = importlib.util.spec_from_file_location("_qhelpers", Path(__file__).with_name("_helpers.py"))
_h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_h)
make_lm = _h.make_lm


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("head")
    return {tie: make_lm(d / f"lm-{tie}", tiny_tokenizer, tie=tie, hidden=64, inter=128) for tie in (False, True)}


def stored(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def qconfig(path):
    return json.loads((path / "config.json").read_text())


def ids():
    return torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))


def reference(base, scheme, head="auto"):
    """What the written checkpoint must compute: the base quantized in memory, the tensors it keeps rounded to
    bfloat16 (a float32 base's 16-bit dtype in a quantized checkpoint)."""
    m = load_lm(base).model
    quantize_model(m, scheme, group_size=128, head=head)
    with torch.no_grad():
        for k, t in m.state_dict().items():
            if t.is_floating_point() and not isinstance(m.get_submodule(k.rsplit(".", 1)[0]), QuantLinear):
                t.copy_(t.to(torch.bfloat16))
        return m(ids())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_default_quantizes_the_head_int8_and_keeps_the_embedding(cli, bases, tmp_path, scheme, tie):
    out = tmp_path / "q"
    r = cli("quantize", bases[tie], "--scheme", scheme, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lm_head"] == "int8-channel"
    man = json.loads((out / "manifest.json").read_text())["contents"]
    assert man["lm_head"] == "int8-channel" and "lm_head.weight" in man["tensors_quantized"]
    cfg = qconfig(out)
    qc = cfg["quantization_config"]
    assert qc["scheme"] == scheme and qc["skip"] == ["embed_tokens"]
    assert qc.get("module_schemes", {}) == ({} if scheme == "int8" else {"lm_head": "int8"})
    assert cfg["tie_word_embeddings"] is False  # the head has codes of its own now
    t = stored(out)
    assert t["lm_head.weight"].dtype == torch.int8 and t["lm_head.weight"].shape == (400, 64)
    assert t["lm_head.weight_scale"].shape == (400,) and "lm_head.weight_zero" not in t
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    lm = load_lm(out)
    assert isinstance(lm.model.lm_head, Int8Linear) and type(lm.model.model.embed_tokens) is torch.nn.Embedding
    assert lm.model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        got = lm.model(ids())
    ref = reference(bases[tie], scheme)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("args", [["--skip", "embed_tokens,lm_head"], ["--output-tensor-type", "float"],
                                  ["--output-tensor-type", "F16"]])
def test_old_behaviour_keeps_the_head_16bit(cli, bases, tmp_path, args, tie):
    out = tmp_path / "q"
    r = cli("quantize", bases[tie], "--scheme", "int4", *args, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lm_head"] == "bfloat16"
    assert "module_schemes" not in qconfig(out)["quantization_config"]
    assert qconfig(out)["tie_word_embeddings"] is tie
    t = stored(out)
    assert ("lm_head.weight" in t) is not tie and "lm_head.weight_scale" not in t
    lm = load_lm(out)
    assert type(lm.model.lm_head) is torch.nn.Linear
    assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) is tie
    with torch.no_grad():
        got = lm.model(ids())
    ref = reference(bases[tie], "int4", head="float")
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("scheme,head,want", [("int8", "int4", "int4-group"), ("int4", "int4", "int4-group"),
                                              ("int4", "nf4", "nf4"), ("nf4", "int8", "int8-channel")])
def test_output_tensor_type_chooses_the_head(cli, bases, tmp_path, scheme, head, want):
    out = tmp_path / "q"
    r = cli("quantize", bases[True], "--scheme", scheme, "--output-tensor-type", head, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lm_head"] == want
    qc = qconfig(out)["quantization_config"]
    assert qc.get("module_schemes", {}) == ({} if head == scheme else {"lm_head": head})
    lm = load_lm(out)
    assert lm.model.lm_head.scheme == head
    with torch.no_grad():
        got = lm.model(ids())
    ref = reference(bases[True], scheme, head=head)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_int8_head_logits_within_the_rounding_bound(cli, bases, tmp_path):
    """The int8 head against the 16-bit one on the same hidden states: row n's weights are rounded to multiples of
    scale_n, so each logit moves by at most ||h||₁·scale_n/2 (float32 summation adds a little)."""
    for name, args in (("q", []), ("f", ["--output-tensor-type", "float"])):
        assert cli("quantize", bases[False], "--scheme", "int4", *args, "-o", tmp_path / name).exit_code == 0
    q, f = load_lm(tmp_path / "q").model, load_lm(tmp_path / "f").model
    with torch.no_grad():
        h = f.hidden_states(ids())  # the blocks are the same int4 layers in both
        assert torch.allclose(q.hidden_states(ids()), h, atol=1e-5)
        got, want = q.lm_head(h), f.lm_head(h)
    bound = h.abs().sum(-1, keepdim=True) * q.lm_head.weight_scale.float() / 2
    assert ((got - want).abs() <= bound * 1.001 + 1e-5).all()
    assert (got - want).abs().max() > 0  # the head really is quantized
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean") / got.shape[1]
    assert kl < 1e-3


def test_dequantize_of_a_tied_model_keeps_the_quantized_head(cli, bases, tmp_path):
    q, deq = tmp_path / "q", tmp_path / "deq"
    assert cli("quantize", bases[True], "--scheme", "int8", "-o", q).exit_code == 0
    r = cli("quantize", q, "--dequantize", "-o", deq)
    assert r.exit_code == 0, r.output
    assert qconfig(deq)["tie_word_embeddings"] is False and "lm_head.weight" in stored(deq)
    with torch.no_grad():
        a, b = load_lm(deq).model(ids()), load_lm(q).model(ids())
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    # quantize and dequantize in one go: the same weights as the two steps, the int8 head included
    r = cli("quantize", bases[True], "--scheme", "int8", "--dequantize", "-o", tmp_path / "one")
    assert r.exit_code == 0, r.output
    assert qconfig(tmp_path / "one")["tie_word_embeddings"] is False
    with torch.no_grad():
        c = load_lm(tmp_path / "one").model(ids())
    assert (c - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int8", "--output-tensor-type", "q8_0"], "with --scheme int8 the output head is float"),
    (["--scheme", "int4", "--output-tensor-type", "int2"], "with --scheme int4 the output head is float"),
    (["--scheme", "int8", "--skip", "lm_head", "--output-tensor-type", "int8"], "--skip keeps lm_head 16-bit"),
    (["--scheme", "int8", "--token-embedding-type", "q8_0"], "--token-embedding-type applies to GGML")])
def test_head_refusals(cli, bases, tmp_path, args, message):
    r = cli("quantize", bases[True], *args, "-o", tmp_path / "bad")
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "bad").exists()
