"""`gentool quantize` end to end: the artifact, loading it, the damage report, chaining into sample/perplexity,
--dequantize, and the refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from gentool.config import config_from_preset
from gentool.models.checkpoint import load_lm, save_lm
from gentool.models.transformer import Transformer


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    """A tiny random lm-checkpoint artifact with a real SentencePiece tokenizer, and some text."""
    from gentool.artifacts import create_artifact

    d = tmp_path_factory.mktemp("q")
    shutil.copytree(tiny_tokenizer, d / "tok")
    cfg = config_from_preset("tiny", vocab_size=400, hidden_size=64, intermediate_size=128,
                             max_position_embeddings=64)
    m = Transformer(cfg)
    m.init_weights(0)
    with create_artifact(d / "lm", "lm-checkpoint", config={"test": True}) as art:
        save_lm(m, cfg, art.dir)
        (art.dir / "tokenizer.model").write_bytes((d / "tok" / "tokenizer.model").read_bytes())
    (d / "text.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 4)
    return d


def logits(path, ids):
    with torch.no_grad():
        return load_lm(path).model(ids)


ROW_BITS = 8 + 32 * 512 / 36864  # per block: 512 output rows with a float32 scale each over 36864 int8 weights
HEAD = 400 * 64  # the output head's weights; by default int8 with a float32 scale per row (400 rows)
INT8_BITS = (36864 * 2 * 8 + 512 * 2 * 32 + HEAD * 8 + 400 * 32) / (36864 * 2 + HEAD)  # two blocks and the head
INT4_BITS = (36864 * 2 * 5.0 + HEAD * 8 + 400 * 32) / (36864 * 2 + HEAD)  # int4 g32: 4 + 2·16/32 bits


@pytest.mark.parametrize("scheme,args,bits", [("int8", [], INT8_BITS), ("int4", ["--group-size", "32"], INT4_BITS),
                                              ("nf4", [], None), ("fp8", ["--keep-16bit", "first"], ROW_BITS)])
def test_quantize_writes_loadable_artifact(cli, base, tmp_path, scheme, args, bits):
    out = tmp_path / scheme
    r = cli("quantize", base / "lm", "--scheme", scheme, *args, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "gentool.quantized-checkpoint"
    c = man["contents"]
    assert c["base_model_relation"] == "quantized" and c["base_sha256"] and c["base_id"]
    assert "model.embed_tokens.weight" in c["skipped"]
    if scheme == "fp8":  # --keep-16bit first: block 0 stays 16-bit; fp8 keeps the output head 16-bit
        assert not any(t.startswith("model.layers.0.") for t in c["tensors_quantized"])
        assert "model.layers.0.mlp.down_proj.weight" in c["skipped"] and "lm_head.weight" in c["skipped"]
        assert c["lm_head"] == res["lm_head"] == "bfloat16"
    else:  # 14 block layers and the output head, int8
        assert len(c["tensors_quantized"]) == 15 and "lm_head.weight" in c["tensors_quantized"]
        assert c["lm_head"] == res["lm_head"] == "int8-channel"
    if bits:
        assert c["bits_per_weight"] == pytest.approx(bits)
    assert res["bytes"] == (out / "model.safetensors").stat().st_size < res["base_bytes"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gentool" and qc["scheme"] == scheme
    assert (out / "tokenizer.model").is_file()
    lm = load_lm(out)
    assert lm.manifest.kind == "quantized-checkpoint"
    ids = torch.randint(0, 400, (1, 20))
    ref, got = logits(base / "lm", ids), logits(out, ids)
    assert (got - ref).abs().max() < 0.15 * ref.abs().max()


def test_int8_damage_near_zero_and_reference_report(cli, base, tmp_path):
    out = tmp_path / "q8"
    r = cli("quantize", base / "lm", "--scheme", "int8", "-o", out, "--eval", base / "text.txt", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["tokens"] > 20 and res["kl_mean"] < 1e-3 and res["top1_agreement"] > 0.9
    assert abs(res["delta_ppl_pct"]) < 1.0
    assert json.loads((out / "manifest.json").read_text())["metrics"]["kl_mean"] == res["kl_mean"]
    r = cli("perplexity", out, base / "text.txt", "--reference", base / "lm", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["kl_mean"] == pytest.approx(res["kl_mean"], rel=1e-6) and rep["scheme"] == "int8-channel"
    r = cli("perplexity", base / "lm", base / "text.txt", "--reference", base / "lm", "--json")
    same = json.loads(r.stdout)  # a model against itself: no damage at all
    assert same["kl_mean"] == pytest.approx(0, abs=1e-9) and same["top1_agreement"] == 1.0
    assert same["ppl_base"] == same["ppl_quant"]


def test_chains_into_sample_and_perplexity(cli, base, tmp_path):
    out = tmp_path / "q4"
    assert cli("quantize", base / "lm", "--scheme", "int4", "--group-size", "64", "-o", out).exit_code == 0
    r = cli("sample", out, "--prompt", "Now is", "--max-new-tokens", "5", "--temperature", "0", "--json",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0])["tokens"] == 5
    r = cli("perplexity", out, base / "text.txt", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    ppl = json.loads(r.stdout)["perplexity"]
    base_ppl = json.loads(cli("perplexity", base / "lm", base / "text.txt", "--json", "--device", "cpu").stdout)
    assert ppl == pytest.approx(base_ppl["perplexity"], rel=0.1)


def test_dequantize_round_trip(cli, base, tmp_path):
    q, deq = tmp_path / "nf4", tmp_path / "deq"
    assert cli("quantize", base / "lm", "--scheme", "nf4", "-o", q).exit_code == 0
    r = cli("quantize", q, "--dequantize", "-o", deq)
    assert r.exit_code == 0, r.output
    man = json.loads((deq / "manifest.json").read_text())
    assert man["format"] == "gentool.lm-checkpoint" and man["inputs"][0]["role"] == "base"
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    ids = torch.randint(0, 400, (1, 20))
    assert torch.allclose(logits(deq, ids), logits(q, ids), atol=1e-4)
    # --dequantize of a 16-bit base: quantize and dequantize in one go (the same weights as the two steps)
    r = cli("quantize", base / "lm", "--scheme", "nf4", "--dequantize", "-o", tmp_path / "fake")
    assert r.exit_code == 0, r.output
    assert torch.allclose(logits(tmp_path / "fake", ids), logits(q, ids), atol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int3"], "unknown scheme 'int3'"),
    (["--scheme", "int4", "--group-size", "48"], "group size 48 is not supported"),
    (["--scheme", "int8", "--group-size", "64"], "--group-size applies to int4 only"),
    (["--scheme", "fp8", "--keep-16bit", "middle"], "--keep-16bit 'middle'"),
    ([], "no --scheme"),
])
def test_bad_options_refused(cli, base, tmp_path, args, message):
    r = cli("quantize", base / "lm", *args, "-o", tmp_path / "out")
    assert r.exit_code == 2 and message in r.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_requantize_and_indivisible_group_refused(cli, base, tmp_path):
    q = tmp_path / "q"
    assert cli("quantize", base / "lm", "--scheme", "int8", "-o", q).exit_code == 0
    r = cli("quantize", q, "--scheme", "int4", "-o", tmp_path / "qq")
    assert r.exit_code == 2 and "already quantized" in r.output and not (tmp_path / "qq").exists()
    cfg = config_from_preset("tiny", vocab_size=400, hidden_size=48, intermediate_size=96)
    (tmp_path / "odd").mkdir()
    save_lm(Transformer(cfg), cfg, tmp_path / "odd")
    r = cli("quantize", tmp_path / "odd", "--scheme", "int4", "--group-size", "32", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "does not divide" in r.output and not (tmp_path / "o").exists()


def test_corrupt_quantized_checkpoint_refused(cli, base, tmp_path):
    from safetensors.torch import load_file, save_file

    q = tmp_path / "q"
    assert cli("quantize", base / "lm", "--scheme", "int8", "-o", q).exit_code == 0
    sd = load_file(q / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight_scale"]
    (q / "manifest.json").unlink()
    save_file(sd, q / "model.safetensors")
    r = cli("perplexity", q, base / "text.txt")
    assert r.exit_code == 1 and "model.layers.1.mlp.up_proj" in r.output


@pytest.mark.parametrize("scheme", ["int8", "q8_0"])
def test_weights_are_written_once(cli, base, tmp_path, monkeypatch, scheme):
    """The output needs its own size on disk, not twice it (model.safetensors is written once, then renamed)."""
    import safetensors.torch

    writes, save_file = [], safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda tensors, path, *a, **kw: (writes.append(Path(path).name), save_file(tensors, path, *a,
                                                                                                   **kw))[1])
    r = cli("quantize", base / "lm", "--scheme", scheme, "-o", tmp_path / "q")
    assert r.exit_code == 0, r.output
    assert writes.count("model.safetensors") == 1, writes
