"""`lora-extract` and `lora-resize`: the truncated SVD checked against numpy's (Eckart-Young closed form), exact
recovery of a known low-rank change, PEFT loading the result, the KL report, and refusals."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gentool.adapters import read_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tuned(base, out, true_rank=3, noisy=None, seed=1):
    """base + a random rank-`true_rank` change on every linear layer (+ full-rank noise on `noisy`)."""
    g = torch.Generator().manual_seed(seed)
    sd = load_file(base / "model.safetensors")
    for k, v in sd.items():
        if k.rsplit(".", 2)[-2] in LINEAR:
            n, m = v.shape
            sd[k] = v + 0.05 * torch.randn(n, true_rank, generator=g) @ torch.randn(true_rank, m, generator=g)
            if noisy and noisy in k:
                sd[k] += 0.01 * torch.randn(n, m, generator=g)
    out.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    return tmp_path, tmp_path / "base", _tuned(tmp_path / "base", tmp_path / "tuned", noisy="layers.1.mlp.up_proj")


def test_extraction_recovers_a_low_rank_change_and_peft_loads_it(cli, pair):
    tmp, base, tuned = pair
    r = cli("lora-extract", base, tuned, "-o", tmp / "ad", "--rank", "3", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    rows = {row["module"]: row for row in rep["per_module"]}
    assert len(rows) == 14 and rep["r"] == 3
    b0, t0 = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for m, row in rows.items():
        d = (t0[m + ".weight"] - b0[m + ".weight"]).double().numpy()
        s = np.linalg.svd(d, compute_uv=False)
        assert row["rel_error"] == pytest.approx(np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()), rel=1e-3, abs=1e-6)
    assert rows["model.layers.1.mlp.up_proj"]["rel_error"] > 0.05 > rows["model.layers.0.mlp.up_proj"]["rel_error"]
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base),
                                                    tmp / "ad").eval()
        got = peft_model(ids).logits
        exact = transformers.LlamaForCausalLM.from_pretrained(tuned).eval()(ids).logits
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()  # only up_proj of layer 1 loses its noise


def test_energy_threshold_gives_per_module_ranks(cli, pair):
    tmp, base, tuned = pair
    r = cli("lora-extract", base, tuned, "-o", tmp / "ad", "--rank", "16", "--energy", "0.999", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["module"]: row for row in json.loads(r.stdout)["per_module"]}
    assert rows["model.layers.0.self_attn.q_proj"]["rank"] == 3       # a rank-3 change needs 3
    assert rows["model.layers.1.mlp.up_proj"]["rank"] > 3             # the noisy one needs more
    assert all(row["energy"] >= 0.999 - 1e-6 or row["rank"] == 16 for row in rows.values())  # or capped
    assert all(row["rank"] == 1 or row["energy"] - row["rel_error"] ** 2 < 1 for row in rows.values())
    ad = read_adapter(tmp / "ad")
    assert ad.lora["model.layers.1.mlp.up_proj"]["A"].shape[0] == rows["model.layers.1.mlp.up_proj"]["rank"]
    peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), tmp / "ad")  # loads


@pytest.mark.parametrize("args, words", [
    (["--rank", "40"], "exceeds the rank"),
    (["--rank", "0"], "greater than or equal to 1"),
    (["--rank", "4", "--energy", "1.5"], "less than or equal to 1"),
    (["--rank", "4", "--energy", "0"], "outside (0, 1]"),
    (["--rank", "4", "--targets", "nothing_here"], "match no linear layer"),
])
def test_extract_refusals(cli, pair, args, words):
    tmp, base, tuned = pair
    r = cli("lora-extract", base, tuned, "-o", tmp / "out", *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not (tmp / "out").exists()


def test_extract_refuses_a_checkpoint_of_another_shape(cli, pair):
    tmp, base, _ = pair
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CFG, "intermediate_size": 64})).save_pretrained(
        tmp / "other", safe_serialization=True)
    r = cli("lora-extract", base, tmp / "other", "-o", tmp / "out", "--rank", "2")
    assert r.exit_code == 2 and "shape" in r.stderr and not (tmp / "out").exists()


def test_extract_kl_report(cli, tmp_path, tiny_tokenizer, tiny_tokens):
    from gentool.config import config_from_preset
    from gentool.models.checkpoint import save_lm
    from gentool.models.transformer import Transformer

    cfg = config_from_preset("tiny", vocab_size=400)
    model = Transformer(cfg)
    model.init_weights(0)
    (tmp_path / "base").mkdir()
    save_lm(model, cfg, tmp_path / "base")
    shutil.copy(tiny_tokenizer / "tokenizer.model", tmp_path / "base" / "tokenizer.model")
    tuned = _tuned(tmp_path / "base", tmp_path / "tuned", true_rank=3)
    args = ["--eval", tiny_tokens, "--max-tokens", "600", "--window", "32", "--json"]
    reps = {}
    for rank in (1, 2, 3):
        r = cli("lora-extract", tmp_path / "base", tuned, "-o", tmp_path / f"r{rank}", "--rank", str(rank), *args)
        assert r.exit_code == 0, r.output
        reps[rank] = json.loads(r.stdout)
    assert reps[3]["kl_mean"] < 1e-6 and reps[3]["top1_agreement"] == 1.0     # the change's rank: TUNED exactly
    assert reps[1]["kl_mean"] > reps[2]["kl_mean"] > reps[3]["kl_mean"]
    assert reps[1]["kl_mean"] < reps[1]["kl_mean_base"] and reps[1]["tokens"] == 600
    man = json.loads((tmp_path / "r2" / "manifest.json").read_text())
    assert man["format"] == "gentool.lora-adapter" and man["metrics"]["kl_mean"] == reps[2]["kl_mean"]
    assert len(man["metrics"]["per_module"]) == 14


def test_resize_is_the_truncated_svd_of_the_adapter(cli, pair):
    tmp, base, _ = pair
    torch.manual_seed(1)
    lc = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, r=6, lora_alpha=4, use_rslora=True,
                         target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 4})
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), lc).save_pretrained(tmp / "ad6")
    r = cli("lora-resize", tmp / "ad6", "-o", tmp / "ad2", "--rank", "2", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["module"]: row for row in json.loads(r.stdout)["per_module"]}
    old, new = read_adapter(tmp / "ad6"), read_adapter(tmp / "ad2")
    for m, p in old.lora.items():
        d = (old.scaling(m) * p["B"] @ p["A"]).double()
        u, s, vh = np.linalg.svd(d.numpy())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        got = (new.scaling(m) * new.lora[m]["B"] @ new.lora[m]["A"]).double().numpy()
        np.testing.assert_allclose(got, best, atol=1e-5)
        assert rows[m]["rel_error"] == pytest.approx(np.sqrt((s[2:] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
    same = cli("lora-resize", tmp / "ad6", "-o", tmp / "ad4", "--rank", "4", "--energy", "1.0", "--json")
    assert same.exit_code == 0
    r = cli("lora-resize", tmp / "ad6", "-o", tmp / "big", "--rank", "8")
    assert r.exit_code == 2 and "exceeds the rank" in r.stderr and not (tmp / "big").exists()
    lc = peft.LoraConfig(task_type="CAUSAL_LM", r=2, use_dora=True, target_modules=["q_proj"])
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), lc).save_pretrained(tmp / "dora")
    r = cli("lora-resize", tmp / "dora", "-o", tmp / "d1", "--rank", "1")
    assert r.exit_code == 2 and "DoRA" in r.stderr
