"""`gentool lora-merge` end to end on a Hugging Face base and PEFT / gentool adapters, and its refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.oracle

CFG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}


def hf_base(path, seed=0, **over):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CFG, **over})).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def peft_adapter(base, path, seed=1, **kw):
    lc = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                         **({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | kw))
    torch.manual_seed(seed)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), lc).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def setup(tmp_path):
    base = hf_base(tmp_path / "base")
    model = peft_adapter(base, tmp_path / "ad")
    return tmp_path, base, tmp_path / "ad", model


def test_merge_peft_adapter_loads_in_transformers(cli, setup):
    tmp, base, ad, pmodel = setup
    r = cli("lora-merge", base, ad, "-o", tmp / "merged", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["modules_merged"] == 4
    manifest = json.loads((tmp / "merged" / "manifest.json").read_text())
    assert manifest["format"] == "gentool.lm-checkpoint"
    assert [i["role"] for i in manifest["inputs"]] == ["base", "adapter"]
    ids = torch.randint(0, 64, (2, 9))
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, pmodel(ids).logits, rtol=1e-4, atol=1e-5)


def test_weighted_merge_of_two_adapters_and_dtype(cli, setup):
    tmp, base, ad, _ = setup
    peft_adapter(base, tmp / "ad2", seed=2, target_modules=["v_proj", "up_proj"], r=2, lora_alpha=3,
                 use_rslora=True)
    r = cli("lora-merge", base, f"{ad}:0.5", f"{tmp / 'ad2'}:-0.25", "-o", tmp / "mix", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    got = load_file(tmp / "mix" / "model.safetensors")
    w = load_file(base / "model.safetensors")
    a1, a2 = load_file(ad / "adapter_model.safetensors"), load_file(tmp / "ad2" / "adapter_model.safetensors")
    key = "model.layers.1.self_attn.v_proj"

    def delta(sd, s):
        p = "base_model.model." + key
        return s * sd[p + ".lora_B.weight"] @ sd[p + ".lora_A.weight"]

    want = w[key + ".weight"] + 0.5 * delta(a1, 8 / 4) - 0.25 * delta(a2, 3 / 2 ** 0.5)
    assert got[key + ".weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got[key + ".weight"], want.to(torch.bfloat16))
    up = "model.layers.0.mlp.up_proj.weight"
    key = up[:-len(".weight")]
    want_up = w[up] - 0.25 * delta(a2, 3 / 2 ** 0.5)
    torch.testing.assert_close(got[up], want_up.to(torch.bfloat16))
    assert json.loads((tmp / "mix" / "config.json").read_text())["dtype"] == "bfloat16"


def _edit_config(ad, **kw):
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(kw)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(ad, fn):
    sd = load_file(ad / "adapter_model.safetensors")
    fn(sd)
    save_file(sd, ad / "adapter_model.safetensors")


A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("breakage, words", [
    (lambda ad: _edit_config(ad, fan_in_fan_out=True), "fan_in_fan_out"),
    (lambda ad: _edit_config(ad, bias="all"), "trained biases"),
    (lambda ad: _edit_config(ad, lora_bias=True), "lora_bias"),
    (lambda ad: _edit_config(ad, peft_type="IA3"), "adapter type IA3"),
    (lambda ad: _edit_config(ad, r=8), "rank 4, adapter_config.json says 8"),
    (lambda ad: _edit_config(ad, target_modules=["q_proj", "v_proj", "k_proj"]), "lacks the LoRA tensors"),
    (lambda ad: _edit_config(ad, target_modules=["q_proj"]), "target_modules do not name"),
    (lambda ad: _edit_tensors(ad, lambda sd: sd.pop(A)), "lacks A"),
    (lambda ad: _edit_tensors(ad, lambda sd: sd.update({"base_model.model.model.norm.extra": torch.ones(2)})),
     "unexpected tensor"),
    (lambda ad: _edit_tensors(ad, lambda sd: sd.update({A.replace("layers.0", "layers.7"): sd[A].clone(),
                                                        A.replace("layers.0", "layers.7").replace("_A", "_B"):
                                                        sd[A.replace("_A", "_B")].clone()})), "does not have"),
    (lambda ad: (ad / "adapter_model.safetensors").write_bytes(b"garbage"), "not a valid safetensors file"),
])
def test_bad_adapters_are_refused_with_one_line(cli, setup, breakage, words):
    tmp, base, ad, _ = setup
    breakage(ad)
    r = cli("lora-merge", base, ad, "-o", tmp / "out")
    assert r.exit_code in (1, 2), r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert not (tmp / "out").exists()
    assert not list(tmp.glob(".out.tmp*"))


def test_shape_mismatch_and_existing_output(cli, setup):
    tmp, _, ad, _ = setup
    other = hf_base(tmp / "other", hidden_size=16, intermediate_size=24)
    r = cli("lora-merge", other, ad, "-o", tmp / "out")
    assert r.exit_code == 2 and "do not fit the base" in r.stderr
    (tmp / "out").mkdir()
    r = cli("lora-merge", tmp / "base", ad, "-o", tmp / "out")
    assert r.exit_code == 2 and "output exists" in r.stderr


def test_gentool_adapter_checks_base_sha256(cli, setup):
    from gentool.adapters import read_adapter, write_adapter
    from gentool.artifacts import create_artifact, sha256_file

    tmp, base, ad, _ = setup
    peft_ad = read_adapter(ad)
    tensors = {f"{m}.lora_{p}.weight": t for m, parts in peft_ad.lora.items() for p, t in parts.items()}
    with create_artifact(tmp / "gad", "lora-adapter") as b:
        write_adapter(b.dir, tensors, peft_ad.cfg, base_name=str(base))
        b.contents = {"base_sha256": sha256_file(base / "model.safetensors")}
    assert cli("lora-merge", base, tmp / "gad", "-o", tmp / "ok").exit_code == 0
    other = hf_base(tmp / "other", seed=5)
    r = cli("lora-merge", other, tmp / "gad", "-o", tmp / "out")
    assert r.exit_code == 2 and "sha256" in r.stderr and "--ignore-base-mismatch" in r.stderr
    r = cli("lora-merge", other, tmp / "gad", "-o", tmp / "out", "--ignore-base-mismatch")
    assert r.exit_code == 0, r.output
