"""`lora-merge --method`: every combination type of PEFT's add_weighted_adapter against PEFT itself on the same
adapters, dense TIES/DARE of fine-tuned checkpoints against a naive implementation of the papers, and refusals."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gentool.adapters import read_adapter  # noqa: E402

pytestmark = pytest.mark.oracle

CFG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
ALL = ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
       "magnitude_prune", "magnitude_prune_svd"]
WEIGHTS = [0.7, -0.4]


def hf_base(path, seed=0):
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).save_pretrained(path, safe_serialization=True)
    return path


def peft_adapter(base, path, seed, **kw):
    torch.manual_seed(seed)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                                peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw))
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods")
    base = hf_base(d / "base")
    peft_adapter(base, d / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_adapter(base, d / "b", 2, r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"])
    peft_adapter(base, d / "c", 3, r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"])  # another rank
    return d


def peft_merge(d, names, method, seed=0, weights=WEIGHTS, **kw):
    """PEFT's merged adapter "m" as {module: ΔW}, made as a user would: `torch.manual_seed(seed)` then
    add_weighted_adapter (whose injection of the new adapter draws from the generator before DARE's masks do)."""
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(d / "base"), d / names[0],
                                           adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(d / n, adapter_name=n)
    inner = model.base_model
    torch.manual_seed(seed)
    inner.add_weighted_adapter(names, weights[:len(names)], "m", combination_type=method, **kw)
    out = {}
    for name, mod in inner.model.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            out[name] = (mod.get_delta_weight("m").detach().clone(),
                         mod.lora_B["m"].weight.detach() @ mod.lora_A["m"].weight.detach())
    return out


def ours(cli, d, names, method, out, *extra):
    args = [f"{d / n}:{w}" for n, w in zip(names, WEIGHTS)]
    r = cli("lora-merge", d / "base", *args, "-o", out, "--method", method, "--as-adapter", *extra, "--json")
    assert r.exit_code == 0, r.output
    ad = read_adapter(out)
    return {m: ad.scaling(m) * p["B"] @ p["A"] for m, p in ad.lora.items()}, json.loads(r.stdout)


@pytest.mark.parametrize("method", ALL)
def test_each_method_equals_peft_add_weighted_adapter(cli, adapters, tmp_path, method):
    d = adapters
    kw, extra = {}, []
    if method not in ("linear", "cat", "svd"):
        kw["density"] = 0.5
        extra += ["--density", "0.5"]
    if "ties" in method:
        kw["majority_sign_method"] = "frequency"
        extra += ["--majority-sign", "frequency"]
    if method.endswith("svd"):
        kw["svd_rank"] = 3
        extra += ["--rank", "3"]
    want = peft_merge(d, ["a", "b"], method, seed=7, **kw)
    got, summary = ours(cli, d, ["a", "b"], method, tmp_path / "m", *extra, "--seed", "7")
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m][0], rtol=1e-4, atol=1e-5, msg=m)
    assert summary["space"] == ("factors" if method in ("linear", "cat", "ties", "dare_linear", "dare_ties",
                                                        "magnitude_prune") else "dense")
    if method.startswith("dare"):  # the seed matters, and is honoured
        other, _ = ours(cli, d, ["a", "b"], method, tmp_path / "m2", *extra, "--seed", "8")
        assert any(not torch.allclose(other[m], got[m]) for m in got)


@pytest.mark.parametrize("method", ["cat", "svd", "ties_svd"])
def test_mixed_ranks_where_peft_takes_them(cli, adapters, tmp_path, method):
    d = adapters
    kw, extra = ({"density": 0.6}, ["--density", "0.6"]) if method == "ties_svd" else ({}, [])
    want = peft_merge(d, ["a", "c"], method, **kw)
    got, _ = ours(cli, d, ["a", "c"], method, tmp_path / "m", *extra)
    for m in want:
        torch.testing.assert_close(got[m], want[m][0], rtol=1e-4, atol=1e-5, msg=m)


def test_task_arithmetic_adapter_is_exact_and_svd_of_it_is_optimal(cli, adapters, tmp_path):
    d = adapters
    exact, s = ours(cli, d, ["a", "c"], "task_arithmetic", tmp_path / "ta")
    assert s["r"] == 4 and read_adapter(tmp_path / "ta").cfg.rank_pattern  # cat: rank 4 + 2 where both apply
    a, c = read_adapter(d / "a"), read_adapter(d / "c")
    q = "model.layers.0.self_attn.q_proj"
    want = 0.7 * a.scaling(q) * a.lora[q]["B"] @ a.lora[q]["A"] - 0.4 * c.scaling(q) * c.lora[q]["B"] @ c.lora[q]["A"]
    torch.testing.assert_close(exact[q], want, rtol=1e-5, atol=1e-6)
    low, _ = ours(cli, d, ["a", "c"], "svd", tmp_path / "svd", "--rank", "2")
    # Eckart-Young: the rank-2 truncation's error is the norm of the discarded singular values
    sv = torch.linalg.svdvals(want.double())
    assert float(torch.linalg.norm(low[q].double() - want.double())) == pytest.approx(float(sv[2:].norm()), rel=1e-4)


def test_rslora_inputs_give_a_correctly_scaled_adapter(cli, tmp_path):
    """PEFT copies use_rslora into the merged config (scaling r/√r instead of 1); gentool writes the same factors
    as a plain LoRA, so its change is PEFT's B A, not PEFT's mis-scaled delta."""
    base = hf_base(tmp_path / "base")
    for n, seed in (("a", 1), ("b", 2)):
        peft_adapter(base, tmp_path / n, seed, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    want = peft_merge(tmp_path, ["a", "b"], "svd")
    got, _ = ours(cli, tmp_path, ["a", "b"], "svd", tmp_path / "m")
    for m in want:
        torch.testing.assert_close(got[m], want[m][1], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got[m], want[m][0])


def _ties_reference(deltas, weights, density, sign="total"):
    """TIES-merging (Yadav et al. 2023, Alg. 1) in numpy: trim, elect, disjoint mean."""
    trimmed = []
    for t in deltas:
        k = int(density * t.size)
        keep = np.zeros(t.size, bool)
        keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = True
        trimmed.append(np.where(keep.reshape(t.shape), t, 0.0))
    stack = np.stack(trimmed)
    elected = np.where((stack.sum(0) if sign == "total" else np.sign(stack).sum(0)) >= 0, 1.0, -1.0)
    agree = np.sign(stack) == elected
    w = np.asarray(weights).reshape(-1, *[1] * (stack.ndim - 1))
    return (stack * w * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_dense_ties_of_two_fine_tunes_matches_the_paper(cli, tmp_path):
    base = hf_base(tmp_path / "base")
    w0 = load_file(base / "model.safetensors")
    for n, seed in (("ft1", 1), ("ft2", 2)):
        g = torch.Generator().manual_seed(seed)
        (tmp_path / n).mkdir()
        (tmp_path / n / "config.json").write_text((base / "config.json").read_text())
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w0.items()},
                  tmp_path / n / "model.safetensors")
    r = cli("lora-merge", base, f"{tmp_path / 'ft1'}:1.0", f"{tmp_path / 'ft2'}:0.5", "-o", tmp_path / "m",
            "--method", "ties", "--density", "0.3", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["space"] == "dense" and json.loads(r.stdout)["fine_tunes"] == 2
    got = load_file(tmp_path / "m" / "model.safetensors")
    f1, f2 = load_file(tmp_path / "ft1" / "model.safetensors"), load_file(tmp_path / "ft2" / "model.safetensors")
    for k in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        want = w0[k].numpy() + _ties_reference([(f1[k] - w0[k]).numpy(), (f2[k] - w0[k]).numpy()], [1.0, 0.5], 0.3)
        np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=k)
    r = cli("lora-merge", base, tmp_path / "ft1", "-o", tmp_path / "one")  # one fine-tune at weight 1: itself
    assert r.exit_code == 0
    one = load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(one[k], f1[k]) for k in f1)


def test_dare_keeps_the_expected_change(cli, adapters, tmp_path):
    """DARE rescales what it keeps by 1/density: over seeds, the mean of dropped-and-rescaled merges (into the
    checkpoint, no truncation) approaches the undropped task arithmetic."""
    d = adapters
    args = [f"{d / n}:{w}" for n, w in zip(["a", "b"], WEIGHTS)]
    key = "model.layers.1.self_attn.q_proj.weight"

    def merged(out, *extra):
        r = cli("lora-merge", d / "base", *args, "-o", tmp_path / out, *extra)
        assert r.exit_code == 0, r.output
        return load_file(tmp_path / out / "model.safetensors")[key]

    full = merged("full")
    runs = [merged(f"d{s}", "--method", "dare_linear_svd", "--density", "0.5", "--seed", str(s)) for s in range(6)]
    err_one = float((runs[0] - full).norm())
    assert err_one > 0
    assert float((torch.stack(runs).mean(0) - full).norm()) < 0.6 * err_one


@pytest.mark.parametrize("args, words", [
    (["--method", "ties", "--density", "0.5"], "needs equal ranks"),
    (["--method", "linear"], "needs equal ranks"),
    (["--method", "ties", "--density", "0"], "outside (0, 1]"),
    (["--method", "dare_linear", "--density", "1.5"], "less than or equal to 1"),
    (["--method", "dare_ties"], "needs --density"),
    (["--method", "nope"], "unknown --method"),
    (["--method", "svd", "--rank", "40"], "exceeds the rank"),
    (["--method", "task_arithmetic", "--density", "0.5"], "does not apply"),
    (["--method", "ties", "--rank", "2", "--density", "0.5"], "--rank applies"),
])
def test_refusals_are_one_line_and_write_nothing(cli, adapters, tmp_path, args, words):
    d = adapters
    r = cli("lora-merge", d / "base", d / "a", d / "c", "-o", tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_dora_refused_by_factor_methods_and_different_bases_refused(cli, adapters, tmp_path):
    d = adapters
    peft_adapter(d / "base", tmp_path / "dora", 4, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    r = cli("lora-merge", d / "base", d / "a", tmp_path / "dora", "-o", tmp_path / "out", "--method", "cat")
    assert r.exit_code == 2 and "DoRA adapter" in r.stderr and "--method cat" in r.stderr
    r = cli("lora-merge", d / "base", d / "a", tmp_path / "dora", "-o", tmp_path / "ok")  # dense: fine
    assert r.exit_code == 0, r.output
    from gentool.adapters import write_adapter
    from gentool.artifacts import create_artifact

    for name, sha in (("g1", "1" * 64), ("g2", "2" * 64)):
        ad = read_adapter(d / "a")
        with create_artifact(tmp_path / name, "lora-adapter") as b:
            write_adapter(b.dir, {f"{m}.lora_{p}.weight": t for m, ps in ad.lora.items() for p, t in ps.items()},
                          ad.cfg, base_name="x")
            b.contents = {"base_sha256": sha}
    r = cli("lora-merge", d / "base", tmp_path / "g1", tmp_path / "g2", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "different bases" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_dare_masks_equal_peft_seeded_before_add_weighted_adapter(cli, adapters, tmp_path, init):
    """PEFT's injection of the merged adapter draws its layers' initial weights (by the first adapter's
    init_lora_weights) before the masks; gentool spends the same draws, so `torch.manual_seed(seed)` then
    add_weighted_adapter gives gentool's --seed masks (the fixture's adapters say init_lora_weights=false)."""
    import shutil

    shutil.copytree(adapters / "base", tmp_path / "base")
    for n in ("a", "b"):
        shutil.copytree(adapters / n, tmp_path / n)
        cfg = json.loads((tmp_path / n / "adapter_config.json").read_text())
        (tmp_path / n / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
    for method, extra in (("dare_ties", []), ("dare_linear_svd", ["--rank", "3"])):
        kw = {"svd_rank": 3} if extra else {}
        want = peft_merge(tmp_path, ["a", "b"], method, seed=5, density=0.5, **kw)
        got, _ = ours(cli, tmp_path, ["a", "b"], method, tmp_path / method, "--density", "0.5", "--seed", "5", *extra)
        for m in want:
            torch.testing.assert_close(got[m], want[m][0], rtol=1e-4, atol=1e-5, msg=m)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "magnitude_prune", "ties_svd", "dare_ties_svd"])
def test_one_adapter_is_merged_linearly_as_peft_does(cli, adapters, tmp_path, method):
    """add_weighted_adapter with a single adapter falls back to `linear` whatever the combination type: no
    pruning, no dropping, the weighted adapter itself (gentool used to prune it)."""
    d = adapters
    want = peft_merge(d, ["a"], method, density=0.5)
    got, summary = ours(cli, d, ["a"], method, tmp_path / "m", "--density", "0.5")
    assert summary["method"] == "linear" and set(got) == set(want)
    a = read_adapter(d / "a")
    for m in want:
        torch.testing.assert_close(got[m], want[m][0], rtol=1e-4, atol=1e-5, msg=m)
        exact = WEIGHTS[0] * a.scaling(m) * a.lora[m]["B"] @ a.lora[m]["A"]
        torch.testing.assert_close(got[m], exact, rtol=1e-4, atol=1e-6, msg=m)
