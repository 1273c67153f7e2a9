"""End to end on tiny models: train-diffusion, sample (+ --score, artifacts), perplexity (ELBO), reflow, errors."""

import json

import numpy as np
import pytest
import torch

from gentool.diffusion.metrics import sliced_wasserstein


def _train(cli, out, *args):
    r = cli("train-diffusion", *args, "-o", str(out), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_tiny_2d_model_beats_the_prior(cli, tmp_path):
    """A 2-D MLP trains on CPU in seconds to a sliced-Wasserstein score far better than the Gaussian prior's."""
    summary = _train(cli, tmp_path / "m", "builtin:8gaussians", "--steps", "400", "--width", "64", "--depth", "2",
                     "--timesteps", "100", "--batch-size", "256", "--lr", "3e-3")
    assert summary["steps"] == 400 and summary["n_params"] < 60_000
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert man["format"] == "gentool.diffusion-checkpoint"
    assert man["config"]["family"] == "ddpm" and man["config"]["schedule"] == {"type": "linear", "steps": 100}
    assert man["contents"]["data_shape"] == [2] and man["contents"]["step"] == 400
    assert {"config.json", "model.safetensors", "ema.safetensors", "metrics.jsonl"} <= set(man["files"])
    r = cli("sample", str(tmp_path / "m"), "-o", str(tmp_path / "s"), "--num-samples", "4000", "--sampler", "ddim",
            "--steps", "20", "--score", "auto", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["nfe"] == 20
    from safetensors.torch import load_file

    from gentool.data.arrays import toy_2d

    held = torch.from_numpy(toy_2d("8gaussians", 4000, 99))
    samples = load_file(str(tmp_path / "s" / "samples.safetensors"))["samples"]
    # the Gaussian prior mapped to data units (the best Gaussian: matched mean and variance)
    # (sampling noise alone gives ~0.1 here: a second draw of the data scores that against `held`)
    prior = sliced_wasserstein(torch.randn(4000, 2) * held.std(0) + held.mean(0), held)
    assert sliced_wasserstein(samples, held) < prior / 2.5
    assert res["sw"] < prior / 2.5
    smani = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert smani["format"] == "gentool.samples" and smani["contents"]["sampler"]["nfe"] == 20
    assert (tmp_path / "s" / "scatter.png").is_file()
    r = cli("perplexity", str(tmp_path / "m"), "--max-examples", "200", "--json")
    assert r.exit_code == 0, r.output
    elbo = json.loads(r.stdout)
    assert elbo["examples"] == 200 and not elbo["discrete"]
    parts = elbo["prior_bpd"] + elbo["diffusion_bpd"] + elbo["decoder_bpd"]
    assert elbo["nelbo_bpd"] == pytest.approx(parts)
    r = cli("perplexity", str(tmp_path / "m"), "--max-examples", "5", "--steps", "10", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["t_terms"] == 10


def test_flow_matching_and_reflow(cli, tmp_path):
    _train(cli, tmp_path / "fm", "builtin:moons", "--family", "flow-matching", "--steps", "30", "--width", "16",
           "--depth", "1")
    _train(cli, tmp_path / "rf", "builtin:moons", "--reflow-from", str(tmp_path / "fm"), "--steps", "10",
           "--reflow-pairs", "300")
    rf = json.loads((tmp_path / "rf" / "manifest.json").read_text())
    assert rf["config"]["family"] == "flow-matching" and rf["config"]["reflow"]["pairs"] == 300
    assert [i["role"] for i in rf["inputs"]] == ["data", "teacher"]
    r = cli("sample", str(tmp_path / "rf"), "--sampler", "euler", "--steps", "1", "--num-samples", "100", "--score",
            "auto", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["nfe"] == 1
    r = cli("perplexity", str(tmp_path / "fm"))
    assert r.exit_code == 2 and "ddpm" in r.output


def test_digits_unet_conditional_grid_and_discrete_elbo(cli, tmp_path):
    _train(cli, tmp_path / "d", "builtin:digits", "--steps", "6", "--width", "16", "--batch-size", "16",
           "--timesteps", "20", "--schedule", "cosine", "--parameterization", "v")
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert man["contents"]["classes"] == [str(i) for i in range(10)] and man["contents"]["data_shape"] == [1, 8, 8]
    assert json.loads((tmp_path / "d" / "config.json").read_text())["denoiser"]["kind"] == "unet"
    r = cli("sample", str(tmp_path / "d"), "-o", str(tmp_path / "g"), "--num-samples", "20", "--class", "3",
            "--guidance", "2", "--sampler", "dpm++2m", "--steps", "5", "--score", "auto", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"sw", "mmd", "sw_features", "mmd_features"} <= set(res)
    from PIL import Image
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "g" / "samples.safetensors"))
    assert t["samples"].dtype == torch.uint8 and t["samples"].shape == (20, 1, 8, 8) and (t["labels"] == 3).all()
    assert Image.open(tmp_path / "g" / "grid.png").size[0] >= 32
    r = cli("perplexity", str(tmp_path / "d"), "--max-examples", "8", "--json")
    assert r.exit_code == 0, r.output
    elbo = json.loads(r.stdout)
    assert elbo["discrete"] and elbo["dims"] == 64 and 0 < elbo["nelbo_bpd"] < 40


def test_image_folder_and_array_inputs(cli, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{k}.png")
    _train(cli, tmp_path / "f", str(tmp_path / "imgs"), "--steps", "2", "--image-size", "8", "--width", "8",
           "--batch-size", "4", "--timesteps", "10")
    c = json.loads((tmp_path / "f" / "manifest.json").read_text())["contents"]
    assert c["data_shape"] == [3, 8, 8] and c["classes"] == ["cats", "dogs"]
    r = cli("sample", str(tmp_path / "f"), "--class", "dogs", "--num-samples", "2", "--steps", "2")
    assert r.exit_code == 0, r.output
    np.save(tmp_path / "v.npy", rng.normal(size=(64, 3)).astype(np.float32))
    _train(cli, tmp_path / "v", str(tmp_path / "v.npy"), "--steps", "2", "--width", "16", "--batch-size", "8")
    assert json.loads((tmp_path / "v" / "manifest.json").read_text())["contents"]["data_shape"] == [3]


def test_bad_inputs_give_one_line_errors(cli, tmp_path):
    r = cli("train-diffusion", "nope", "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "builtin:moons" in r.output
    np.save(tmp_path / "bad.npy", np.full((4, 1, 4, 4), 3.0, dtype=np.float32))
    r = cli("train-diffusion", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "[0, 1]" in r.output
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    r = cli("train-diffusion", str(tmp_path / "junk.npy"), "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "cannot read" in r.output
    r = cli("train-diffusion", "builtin:moons", "-o", str(tmp_path / "x"), "--family", "gan")
    assert r.exit_code == 2
    assert not (tmp_path / "x").exists()
    _train(cli, tmp_path / "m", "builtin:moons", "--steps", "2", "--width", "8", "--timesteps", "10")
    for args, words in ((("--class", "1"), "without classes"), (("--sampler", "midpoint"), "does not apply"),
                        (("--steps", "11"), "between 1 and 10"), (("--eta", "2"), "eta")):
        r = cli("sample", str(tmp_path / "m"), *args)
        assert r.exit_code == 2 and words in r.output, r.output
    r = cli("train-diffusion", "builtin:moons", "-o", str(tmp_path / "m"), "--steps", "2")
    assert r.exit_code == 2 and "exists" in r.output


@pytest.mark.parametrize("data", ["builtin:moons", "tokens"])
@pytest.mark.parametrize("lr", ["0", "inf", "nan"])
def test_an_unusable_lr_is_refused_not_replaced(cli, tmp_path, tiny_tokens, data, lr):
    """`--lr 0` used to become 1e-3 (`lr or 1e-3`) and `--lr inf` started a run that left OUTPUT.partial."""
    data = str(tiny_tokens) if data == "tokens" else data
    r = cli("train-diffusion", data, "-o", tmp_path / "m", "--steps", "2", "--batch-size", "4", "--seq-len", "16",
            "--preset", "tiny", "--model", "mlp", "--width", "8", "--device", "cpu", "--lr", lr)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--lr" in r.stderr, r.output
    assert not list(tmp_path.glob("m*"))


def test_lm_batch_size_and_lr_are_honoured(cli, tmp_path, tiny_tokens):
    """--batch-size above 64 used to be cut to 64 for LMs; explicit values are the run's values."""
    _train(cli, tmp_path / "m", str(tiny_tokens), "--preset", "tiny", "--seq-len", "16", "--steps", "1",
           "--batch-size", "80", "--lr", "5e-4")
    config = json.loads((tmp_path / "m" / "manifest.json").read_text())["config"]
    assert config["micro_batch"] == 80 and config["train"]["lr"] == 5e-4
    _train(cli, tmp_path / "d", "builtin:moons", "--steps", "1", "--model", "mlp", "--width", "8",
           "--batch-size", "300")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["config"]["batch_size"] == 300
