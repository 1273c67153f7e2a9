"""Calibration: the importance matrix against a naive computation, its file going either way with llama.cpp, the
K-quants and int4 it drives, better data-free int4, --target-kl, and the refusals."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gentool.codecs import ggml
from gentool.codecs import quant as qp
from gentool.codecs.imatrix import read_imatrix
from gentool.models.checkpoint import load_lm

_spec = importlib.util.spec_from_file_location("_qhelpers", Path(__file__).with_name("_helpers.py"))
_h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_h)
gguf_tensors, llama_bin, make_lm, needs_llama = _h.gguf_tensors, _h.llama_bin, _h.make_lm, _h.needs_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("cal")
    make_lm(d / "lm", tiny_tokenizer)
    import gentool

    corpus = Path(gentool.__file__).parent / "data" / "bundled" / "shakespeare"
    (d / "calib.txt").write_text((corpus / "comedies" / "twelfth_night.txt").read_text()[:30000])
    (d / "eval.txt").write_text((corpus / "tragedies" / "hamlet.txt").read_text()[:5000])
    return d


def test_importance_matrix_is_the_mean_squared_input(base):
    from gentool.quantize.calibrate import collect

    lm = load_lm(base / "lm")
    ids = torch.randint(0, 400, (300,))
    cal = collect(lm.model, ids, window=100)
    assert cal.tokens == 300 and cal.counts["model.layers.0.self_attn.q_proj.weight"] == 299 + 1
    with torch.no_grad():  # layer 0's attention input, by hand: RMSNorm of the embeddings, window by window
        x = torch.cat([lm.model.model.layers[0].input_layernorm(lm.model.model.embed_tokens(ids[s:s + 100]))
                       for s in range(0, 300, 100)])
    v = cal.values()
    assert np.allclose(v["model.layers.0.self_attn.q_proj.weight"], (x.double() ** 2).mean(0).numpy(), rtol=1e-5)
    assert np.array_equal(v["model.layers.0.self_attn.k_proj.weight"], v["model.layers.0.self_attn.q_proj.weight"])
    assert set(v) == {f"{n}.weight" for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_calibrated_k_quants_and_imatrix_file(cli, base, tmp_path):
    out = tmp_path / "q"
    r = cli("quantize", base / "lm", "--scheme", "q4_k_m", "--calibrate", base / "calib.txt", "--calibrate-tokens",
            "2000", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["calibration"]["tokens"] == 2000 and man["config"]["method"] == "imatrix"
    assert [i["role"] for i in man["inputs"]] == ["base", "calibration"] and man["inputs"][1]["sha256"]
    im = read_imatrix(out / "imatrix.gguf")
    assert "blk.1.ffn_down.weight" in im.sums and int(im.counts["blk.0.attn_q.weight"][0]) == 2000
    assert "output.weight" in im.sums  # an untied head, as llama-imatrix --process-output
    values = im.values()
    lm = load_lm(base / "lm")
    sd = lm.model.state_dict()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    from safetensors.torch import load_file

    from gentool.codecs.gguf_names import gguf_name

    stored = load_file(out / "model.safetensors")
    plain = load_file(cli("quantize", base / "lm", "--scheme", "q4_k_m", "-o", tmp_path / "p") and
                      tmp_path / "p" / "model.safetensors")
    for k, t in qc["tensor_types"].items():
        if t != "F32":
            assert np.array_equal(stored[k].numpy(), ggml.quantize(sd[k].numpy(), t, imatrix=values.get(gguf_name(k))))
    assert any(not torch.equal(stored[k], plain[k]) for k in stored)  # the imatrix changed the blocks
    # the file drives the same quantization back: --imatrix gives the --calibrate result byte for byte
    r = cli("quantize", base / "lm", "--scheme", "q4_k_m", "--imatrix", out / "imatrix.gguf", "-o", tmp_path / "i")
    assert r.exit_code == 0, r.output
    again = load_file(tmp_path / "i" / "model.safetensors")
    assert all(torch.equal(again[k], stored[k]) for k in stored)


def test_int4_optimized_and_calibrated_beat_rtn(cli, base, tmp_path):
    from gentool.data.tokenizer import load_tokenizer
    from gentool.evaluation.compare import compare_logits
    from gentool.models.quant import dequantize_model

    lm = load_lm(base / "lm")
    ids = torch.tensor(load_tokenizer(base / "lm" / "tokenizer.model").encode((base / "eval.txt").read_text()))
    kl = {}
    n, k = lm.model.lm_head.weight.shape  # the output head is int8 (a float32 scale per row), the rest int4 g128
    w4 = sum(m.weight.numel() for name, m in lm.model.named_modules()
             if isinstance(m, torch.nn.Linear) and name != "lm_head")
    bits = (w4 * 4.25 + n * k * 8 + n * 32) / (w4 + n * k)
    for name, args in (("rtn", []), ("optimized", ["--method", "optimized"]),
                       ("gptq", ["--calibrate", base / "calib.txt", "--calibrate-tokens", "1000"])):
        r = cli("quantize", base / "lm", "--scheme", "int4", *args, "-o", tmp_path / name, "--json")
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["bits_per_weight"] == pytest.approx(bits) and res["method"] == name
        q = load_lm(tmp_path / name)
        assert q.model.lm_head.scheme == "int8" and q.model.model.layers[0].mlp.up_proj.scheme == "int4"
        dequantize_model(q.model)  # the same weights as the int4 kernel's, without its slow CPU path
        kl[name] = compare_logits(lm.model, q.model, ids, window=128)["kl_mean"]
    assert kl["optimized"] < 0.95 * kl["rtn"] and kl["gptq"] < 0.85 * kl["rtn"]
    from gentool.quantize.int4 import quantize_int4_optimized

    w = load_lm(base / "lm").model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    rtn, opt = qp.quantize_int4(w, 128), quantize_int4_optimized(w, 128)
    err = lambda t: ((qp.dequantize_int4(t) - w) ** 2).reshape(w.shape[0], -1, 128).sum(-1)
    assert (err(opt) <= err(rtn) * (1 + 1e-6)).all() and err(opt).sum() < 0.9 * err(rtn).sum()


def test_target_kl(cli, base, tmp_path):
    sizes = {}
    for target in ("0.0004", "0.004"):
        r = cli("quantize", base / "lm", "--target-kl", target, "--calibrate", base / "calib.txt",
                "--calibrate-tokens", "512", "-o", tmp_path / target, "--json")
        assert r.exit_code == 0, r.output
        rep = json.loads(r.stdout)["target"]
        assert rep["met"] and rep["measured_kl"] <= float(target)
        sizes[target] = json.loads(r.stdout)["bytes"]
        assert json.loads((tmp_path / target / "manifest.json").read_text())["metrics"]["target_kl"] == rep
    assert sizes["0.004"] <= sizes["0.0004"]
    # the choice, measured again independently: the checkpoint against the base on the calibration tokens
    from gentool.evaluation.compare import compare_logits
    from gentool.quantize.calibrate import calibration_ids

    lm = load_lm(base / "lm")
    ids, _, _ = calibration_ids(lm, [str(base / "calib.txt")], max_tokens=512)
    q = load_lm(tmp_path / "0.0004")
    assert compare_logits(lm.model, q.model, ids, window=128, batch_size=4)["kl_mean"] <= 0.0004


def test_refusals(cli, base, tmp_path, tiny_tokenizer, tiny_tokens):
    from gentool.gguf.tokenizer import read_sentencepiece, write_sentencepiece

    other = make_lm(tmp_path / "other", tiny_tokenizer, hidden=128, inter=256)
    assert cli("quantize", other, "--scheme", "q4_0", "--calibrate", base / "calib.txt", "--calibrate-tokens", "500",
               "-o", tmp_path / "o").exit_code == 0
    r = cli("quantize", base / "lm", "--scheme", "q4_k_m", "--imatrix", tmp_path / "o" / "imatrix.gguf", "-o",
            tmp_path / "x")
    assert r.exit_code == 2 and "computed for another model" in r.output and "blk.0" in r.output
    # a checkpoint whose tokenizer differs from the shards'
    sp = read_sentencepiece(tiny_tokenizer / "tokenizer.model")
    pieces = [(p, s + (0.5 if i == 10 else 0), t) for i, (p, s, t) in enumerate(sp["pieces"])]
    odd = make_lm(tmp_path / "odd", tiny_tokenizer, seed=3)
    (odd / "manifest.json").unlink()
    (odd / "tokenizer.model").write_bytes(write_sentencepiece(pieces, byte_fallback=True, unk=sp["unk"],
                                                              bos=sp["bos"], eos=sp["eos"], pad=sp.get("pad", -1),
                                                              add_dummy_prefix=sp["add_dummy_prefix"]))
    r = cli("quantize", odd, "--scheme", "q4_k_m", "--calibrate", tiny_tokens, "-o", tmp_path / "y")
    assert r.exit_code == 2 and "another tokenizer" in r.output
    for args, message in [(["--scheme", "int8", "--calibrate", base / "calib.txt"], "calibration drives int4 and GGML"),
                          (["--target-kl", "0.01"], "add --calibrate"),
                          (["--scheme", "int4", "--target-kl", "0.01", "--calibrate", base / "calib.txt"],
                           "--target-kl chooses GGML types"),
                          (["--scheme", "q4_k_m", "--calibrate", base / "calib.txt", "--imatrix", "x.gguf"],
                           "both given")]:
        r = cli("quantize", base / "lm", *args, "-o", tmp_path / "z")
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@needs_llama
def test_live_imatrix_goes_either_way(cli, base, tmp_path):
    bin_ = llama_bin()
    assert cli("export-gguf", base / "lm", "-o", tmp_path / "f32.gguf", "--type", "f32").exit_code == 0
    # gentool's imatrix -> llama-quantize: the blocks gentool wrote
    assert cli("quantize", base / "lm", "--scheme", "q4_k_m", "--calibrate", base / "calib.txt", "--calibrate-tokens",
               "1000", "-o", tmp_path / "g").exit_code == 0
    subprocess.run([bin_ / "llama-quantize", "--imatrix", tmp_path / "g" / "imatrix.gguf", tmp_path / "f32.gguf",
                    tmp_path / "ref.gguf", "Q4_K_M"], check=True, capture_output=True)
    assert cli("export-gguf", tmp_path / "g", "-o", tmp_path / "g.gguf").exit_code == 0
    ours, ref = gguf_tensors(tmp_path / "g.gguf"), gguf_tensors(tmp_path / "ref.gguf")
    assert all(ours[n][0] == t and np.array_equal(ours[n][1], d) for n, (t, d) in ref.items())
    # llama-imatrix's file -> gentool: the blocks llama-quantize writes with it
    subprocess.run([bin_ / "llama-imatrix", "-m", tmp_path / "f32.gguf", "-f", base / "calib.txt", "-c", "128",
                    "--chunks", "8", "-o", tmp_path / "l.imatrix"], check=True, capture_output=True,
                   cwd=tmp_path)
    subprocess.run([bin_ / "llama-quantize", "--imatrix", tmp_path / "l.imatrix", tmp_path / "f32.gguf",
                    tmp_path / "ref2.gguf", "Q4_K_M"], check=True, capture_output=True)
    assert cli("quantize", base / "lm", "--scheme", "q4_k_m", "--imatrix", tmp_path / "l.imatrix", "-o",
               tmp_path / "l").exit_code == 0
    assert cli("export-gguf", tmp_path / "l", "-o", tmp_path / "l.gguf").exit_code == 0
    ours, ref = gguf_tensors(tmp_path / "l.gguf"), gguf_tensors(tmp_path / "ref2.gguf")
    assert all(ours[n][0] == t and np.array_equal(ours[n][1], d) for n, (t, d) in ref.items())
    shutil.rmtree(tmp_path / "g")
