"""GGUF LoRA adapters: gentool's reader and writer against the file llama.cpp's own converter made of the same PEFT
adapter (a committed fixture, no build needed), round trips with rsLoRA / patterns folded, refusals, and — where a
llama.cpp build exists — llama.cpp's --lora and llama-export-lora against gentool's merge."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from _peers import llama_bin  # noqa: E402

from gentool.adapters import read_adapter, write_adapter  # noqa: E402
from gentool.models.lora import LoRAConfig  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gguf_lora"


@pytest.fixture
def base(tmp_path):
    cfg = json.loads((FIXTURE / "config.json").read_text())
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(tmp_path / "base",
                                                                                   safe_serialization=True)
    return tmp_path / "base"


def _delta(ad, m):
    return ad.scaling(m) * ad.lora[m]["B"].double() @ ad.lora[m]["A"].double()


def test_reads_the_llama_cpp_converters_file(cli, base, tmp_path):
    r = cli("import-gguf", FIXTURE / "adapter.gguf", "--adapter-of", base, "-o", tmp_path / "ad", "--json")
    assert r.exit_code == 0, r.output
    got, want = read_adapter(tmp_path / "ad"), read_adapter(FIXTURE)
    assert set(got.lora) == set(want.lora) and len(got.lora) == 14
    assert got.cfg.r == 2 and got.cfg.alpha == 5 and got.cfg.target_modules == sorted(want.cfg.target_modules)
    for m in want.lora:
        assert torch.equal(got.lora[m]["A"], want.lora[m]["A"]) and torch.equal(got.lora[m]["B"], want.lora[m]["B"])
        assert got.scaling(m) == want.scaling(m)  # down_proj at rank 3: alpha/3, as llama.cpp and PEFT compute it
    man = json.loads((tmp_path / "ad" / "manifest.json").read_text())
    assert man["format"] == "gentool.lora-adapter" and man["contents"]["r"] == 2


def test_writes_what_the_llama_cpp_converter_writes(cli, base, tmp_path):
    r = cli("export-gguf", FIXTURE, "--adapter-of", base, "-o", tmp_path / "ours.gguf", "--type", "f32")
    assert r.exit_code == 0, r.output
    ours, theirs = gguf.GGUFReader(tmp_path / "ours.gguf"), gguf.GGUFReader(FIXTURE / "adapter.gguf")
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    t_ours = {t.name: t for t in ours.tensors}
    t_theirs = {t.name: t for t in theirs.tensors}
    assert set(t_ours) == set(t_theirs)
    for name, t in t_theirs.items():
        assert t_ours[name].tensor_type == t.tensor_type and list(t_ours[name].shape) == list(t.shape), name
        assert np.array_equal(np.asarray(t_ours[name].data), np.asarray(t.data)), name  # q/k rows permuted alike


def test_round_trip_folds_rslora_and_alpha_patterns(cli, base, tmp_path):
    src = load_np(str(FIXTURE / "adapter_model.safetensors"))
    cfg = LoRAConfig(r=2, alpha=3.0, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"],
                     rank_pattern={"down_proj": 3}, alpha_pattern={"o_proj": 7.0})
    (tmp_path / "rs").mkdir()
    write_adapter(tmp_path / "rs", {k.removeprefix("base_model.model."): torch.from_numpy(v) for k, v in src.items()},
                  cfg, base_name="tiny")
    assert cli("export-gguf", tmp_path / "rs", "--adapter-of", base, "-o", tmp_path / "rs.gguf", "--type",
               "f32").exit_code == 0
    r = cli("import-gguf", tmp_path / "rs.gguf", "--adapter-of", base, "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    a, b = read_adapter(tmp_path / "rs"), read_adapter(tmp_path / "back")
    assert not b.cfg.use_rslora
    for m in a.lora:
        torch.testing.assert_close(_delta(b, m), _delta(a, m), rtol=1e-6, atol=1e-7)
    f16 = cli("export-gguf", tmp_path / "rs", "--adapter-of", base, "-o", tmp_path / "h.gguf")
    assert f16.exit_code == 0 and {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "h.gguf").tensors} == {"F16"}


def test_refusals(cli, base, tmp_path):
    def refused(*args, words):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.stderr

    refused("export-gguf", FIXTURE, "--adapter-of", base, "-o", tmp_path / "q.gguf", "--type", "q8_0",
            words="not available for adapters")
    other = tmp_path / "other"
    cfg = json.loads((FIXTURE / "config.json").read_text())
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, "intermediate_size": 128})).save_pretrained(
        other, safe_serialization=True)
    refused("import-gguf", FIXTURE / "adapter.gguf", "--adapter-of", other, "-o", tmp_path / "x",
            words="do not fit the base")
    refused("export-gguf", FIXTURE, "--adapter-of", other, "-o", tmp_path / "x.gguf", words="do not fit the base")
    assert cli("export-gguf", FIXTURE, "--adapter-of", base, "-o", tmp_path / "ok.gguf").exit_code == 0
    refused("import-gguf", tmp_path / "ok.gguf", "--adapter-of", other, "-o", tmp_path / "x",
            words="exported for a base with weights sha256")
    import peft

    lc = peft.LoraConfig(task_type="CAUSAL_LM", r=2, use_dora=True, target_modules=["q_proj"])
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), lc).save_pretrained(tmp_path / "dora")
    refused("export-gguf", tmp_path / "dora", "--adapter-of", base, "-o", tmp_path / "d.gguf", words="DoRA")
    model_gguf = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model_gguf), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    refused("import-gguf", model_gguf, "--adapter-of", base, "-o", tmp_path / "x", words="not a GGUF LoRA adapter")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*.tmp*"))


# --- against a llama.cpp build ---------------------------------------------------------------------------------------

LLAMA = llama_bin("llama-perplexity", "llama-export-lora")


def _run(*args):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout + r.stderr


def _ppl(model, text, *extra):
    for _ in range(5):  # llama.cpp's log thread sometimes loses its last lines at exit: run again (deterministic)
        out = _run(LLAMA / "llama-perplexity", "-m", model, "-f", text, "-c", "64", "-b", "64", "--chunks", "6",
                   "-t", "2", *extra)
        if found := re.search(r"Final estimate: PPL = ([0-9.]+)", out):
            return float(found.group(1))
    raise AssertionError(out[-2000:])


def _model_gguf(ckpt: Path, out: Path) -> None:
    """export-gguf's file, with the tokenizer metadata read through sentencepiece's API (export-gguf itself parses
    tokenizer.model with protobuf, which is an optional dependency)."""
    import sentencepiece as spm
    from safetensors.torch import load_file

    from gentool.gguf import write_gguf

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    n = sp.get_piece_size()
    kind = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    tok = {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
           "scores": [sp.get_score(i) for i in range(n)], "token_type": kind, "bos": sp.bos_id(), "eos": sp.eos_id(),
           "unknown": sp.unk_id(), "add_bos": True, "add_space_prefix": True}
    config = json.loads((ckpt / "config.json").read_text())
    tensors = {k: v.float().numpy() for k, v in load_file(ckpt / "model.safetensors").items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    write_gguf(out, config, tensors, qtype="f32", tokenizer=tok)


@pytest.mark.skipif(LLAMA is None, reason="needs llama.cpp's llama-perplexity and llama-export-lora "
                                          "($GENTOOL_LLAMA_CPP_BIN)")
def test_llama_cpp_loads_the_adapter_as_gentool_merges_it(cli, tmp_path, tiny_tokenizer):
    from gentool.config import config_from_preset
    from gentool.models.checkpoint import save_lm
    from gentool.models.lora import adapter_state_dict, inject_lora
    from gentool.models.transformer import Transformer

    cfg = config_from_preset("mini", vocab_size=400)
    model = Transformer(cfg)
    model.init_weights(0)
    (tmp_path / "base").mkdir()
    save_lm(model, cfg, tmp_path / "base")
    shutil.copy(tiny_tokenizer / "tokenizer.model", tmp_path / "base" / "tokenizer.model")
    lcfg = LoRAConfig(r=4, alpha=6.0, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3.0},
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "lm_head"])
    inject_lora(model, lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    (tmp_path / "ad").mkdir()
    write_adapter(tmp_path / "ad", adapter_state_dict(model, lcfg), lcfg, base_name="mini")
    for args in (("export-gguf", tmp_path / "ad", "--adapter-of", tmp_path / "base", "-o", tmp_path / "ad.gguf",
                  "--type", "f32"),
                 ("lora-merge", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "merged", "--dtype", "float32")):
        r = cli(*args)
        assert r.exit_code == 0, r.output
    _model_gguf(tmp_path / "base", tmp_path / "base.gguf")
    _model_gguf(tmp_path / "merged", tmp_path / "merged.gguf")
    # llama.cpp's own merge of base + adapter, read back, equals gentool's merge
    _run(LLAMA / "llama-export-lora", "-m", tmp_path / "base.gguf", "--lora", tmp_path / "ad.gguf", "-o",
         tmp_path / "llama-merged.gguf", "-t", "2")
    from safetensors.torch import load_file

    from gentool.gguf import read_gguf

    ours, theirs = load_file(tmp_path / "merged" / "model.safetensors"), read_gguf(tmp_path / "llama-merged.gguf")
    for k in ours:
        scale = float(ours[k].abs().max())
        torch.testing.assert_close(torch.from_numpy(theirs.tensors[k]), ours[k], rtol=0, atol=2e-3 * scale, msg=k)
    # and llama.cpp with --lora computes what gentool's merged checkpoint computes
    text = tmp_path / "text.txt"
    src = Path(__file__).resolve().parents[2] / "src" / "gentool" / "data" / "bundled" / "shakespeare" / "comedies"
    text.write_text(next(src.glob("*.txt")).read_text()[:20000])
    with_lora = _ppl(tmp_path / "base.gguf", text, "--lora", tmp_path / "ad.gguf")
    merged = _ppl(tmp_path / "merged.gguf", text)
    plain = _ppl(tmp_path / "base.gguf", text)
    assert with_lora == pytest.approx(merged, rel=2e-3)
    assert abs(plain / merged - 1) > 0.05  # the adapter changes the model, so the check can fail


def test_reader_refuses_damaged_files_with_one_error(tmp_path):
    """Truncated or corrupted copies of the fixture give a GentoolError, never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gentool.adapters.gguf_lora import read_gguf_adapter
    from gentool.errors import GentoolError

    data = (FIXTURE / "adapter.gguf").read_bytes()

    @settings(max_examples=60, deadline=None)
    @given(cut=st.integers(0, len(data) - 1), pos=st.integers(0, 2000), byte=st.integers(0, 255))
    def check(cut, pos, byte):
        f = tmp_path / "bad.gguf"
        damaged = bytearray(data)
        damaged[pos] = byte
        f.write_bytes(bytes(damaged[:cut]) if cut > 8 else bytes(damaged))
        try:
            read_gguf_adapter(f)
        except GentoolError:
            pass

    check()
