"""--config: recipes in TOML files and exact re-runs from an artifact's manifest."""

import json

import pytest

FLAGS = ["--preset", "tiny", "--steps", "3", "--seq-len", "32", "--micro-batch", "4", "--lr", "3e-3",
         "--schedule", "wsd", "--eval-every", "3", "--device", "cpu"]
RECIPE = """\
preset = "tiny"
steps = 3
seq-len = 32
micro_batch = 4      # dashes or underscores
lr = 3e-3
schedule = "wsd"
eval-every = 3
device = "cpu"
"""


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_a_recipe_file_equals_the_same_flags(cli, tiny_tokens, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    assert cli("train-lm", tiny_tokens, "-o", tmp_path / "flags", *FLAGS).exit_code == 0
    r = cli("train-lm", tiny_tokens, "-o", tmp_path / "file", "--config", tmp_path / "r.toml")
    assert r.exit_code == 0, r.output
    a, b = manifest(tmp_path / "flags"), manifest(tmp_path / "file")
    assert a["fingerprint"] == b["fingerprint"] and a["files"]["model.safetensors"] == b["files"]["model.safetensors"]
    assert b["invocation"]["command"] == "train-lm" and b["invocation"]["options"]["seq-len"] == 32
    assert b["invocation"]["arguments"] == {"tokens": str(tiny_tokens)}


def test_flags_win_and_a_manifest_repeats_its_run(cli, tiny_tokens, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    r = cli("train-lm", tiny_tokens, "-o", tmp_path / "s2", "--config", tmp_path / "r.toml", "--seed", "2")
    assert r.exit_code == 0, r.output
    first = manifest(tmp_path / "s2")
    assert first["config"]["train"]["seed"] == 2 and first["invocation"]["options"]["seed"] == 2
    # no TOKENS argument: it comes from the recorded invocation, like every option
    r = cli("train-lm", "-o", tmp_path / "again", "--config", tmp_path / "s2" / "manifest.json")
    assert r.exit_code == 0, r.output
    again = manifest(tmp_path / "again")
    assert again["fingerprint"] == first["fingerprint"] and again["id"] != "" and \
        again["files"]["model.safetensors"] == first["files"]["model.safetensors"]


@pytest.mark.parametrize("text, words", [
    ('presett = "tiny"\n', "unknown option 'presett'"),
    ('[arguments]\ndata = "x"\n', "unknown argument 'data'"),
    ("steps = \n", "not a valid TOML recipe"),
])
def test_bad_recipes_are_one_line_usage_errors(cli, tiny_tokens, tmp_path, text, words):
    (tmp_path / "bad.toml").write_text(text)
    r = cli("train-lm", tiny_tokens, "-o", tmp_path / "out", "--config", tmp_path / "bad.toml")
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_manifest_of_another_command_is_refused(cli, tiny_tokens, tiny_tokenizer, tmp_path):
    r = cli("train-lm", "-o", tmp_path / "out", "--config", tiny_tokens / "manifest.json")
    assert r.exit_code == 2 and "records no invocation" in r.stderr  # shards made through the API, not the CLI
    assert cli("tokenize", "encode", "builtin:shakespeare/comedies", "--tokenizer", tiny_tokenizer,
               "-o", tmp_path / "tok2", "--val-fraction", "0.1").exit_code == 0
    r = cli("train-lm", "-o", tmp_path / "out", "--config", tmp_path / "tok2")
    assert r.exit_code == 2 and "written by `gentool tokenize encode`" in r.stderr


def test_sample_and_train_diffusion_take_recipes(cli, tmp_path):
    (tmp_path / "d.toml").write_text('steps = 5\nbatch-size = 32\nmodel = "mlp"\nwidth = 16\ndevice = "cpu"\n'
                                     '[arguments]\ndata = "builtin:moons"\n')
    r = cli("train-diffusion", "-o", tmp_path / "moons", "--config", tmp_path / "d.toml", "--json")
    assert r.exit_code == 0, r.output
    assert manifest(tmp_path / "moons")["config"]["model"]["width"] == 16
    (tmp_path / "s.toml").write_text('num-samples = 16\nsteps = 4\nsampler = "ddim"\ndevice = "cpu"\nseed = 7\n')
    a = cli("sample", tmp_path / "moons", "-o", tmp_path / "a", "--config", tmp_path / "s.toml", "--json")
    b = cli("sample", tmp_path / "moons", "-o", tmp_path / "b", "--num-samples", "16", "--steps", "4",
            "--sampler", "ddim", "--device", "cpu", "--seed", "7", "--json")
    assert a.exit_code == b.exit_code == 0, a.output
    ma, mb = manifest(tmp_path / "a"), manifest(tmp_path / "b")
    assert ma["files"]["samples.safetensors"] == mb["files"]["samples.safetensors"]


@pytest.mark.parametrize("command, text, words", [
    ("train-diffusion", "lr = true\n", "option 'lr' in the recipe must be a number, not bool"),
    ("train-diffusion", "steps = 2.5\n", "option 'steps' in the recipe must be an integer, not float"),
    ("train-diffusion", "steps = [3]\n", "option 'steps' in the recipe must be an integer, not list"),
    ("train-diffusion", "unconditional = 1\n", "option 'unconditional' in the recipe must be true or false"),
    ("train-diffusion", 'width = "16"\n', "option 'width' in the recipe must be an integer, not str"),
    ("train-diffusion", "[arguments]\ndata = 3\n", "argument 'data' in the recipe must be a string, not int"),
    ("train-lm", "lr = true\n", "option 'lr' in the recipe must be a number, not bool"),
    ("train-lm", "init-from = 1\n", "option 'init-from' in the recipe must be a path (a string), not int"),
])
def test_recipe_values_must_have_the_options_types(cli, tiny_tokens, tmp_path, command, text, words):
    """click would take TOML `lr = true` as 1.0 and `steps = 2.5` as 2: a wrong type is refused, naming the key."""
    (tmp_path / "r.toml").write_text(text)
    data = tiny_tokens if command == "train-lm" else "builtin:moons"
    r = cli(command, data, "-o", tmp_path / "out", "--config", tmp_path / "r.toml", "--steps", "1", "--device", "cpu") \
        if "steps" not in text and "data" not in text else \
        cli(command, "-o", tmp_path / "out", "--config", tmp_path / "r.toml", *([data] if "data" not in text else []))
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("invocation, words", [
    ({"options": {"steps": "three"}}, "option 'steps' in the recipe must be an integer, not str"),
    ({"options": {"lr": [1e-3]}}, "option 'lr' in the recipe must be a number, not list"),
    ({"arguments": ["tokens"]}, "the manifest's invocation is malformed"),
    ({"options": "steps=3"}, "the manifest's invocation is malformed"),
])
def test_a_manifest_invocation_of_wrong_types_is_a_usage_error(cli, tmp_path, invocation, words):
    m = {"format": "gentool.lm-checkpoint", "invocation": {"command": "train-lm", **invocation}}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    r = cli("train-lm", "-o", tmp_path / "out", "--config", tmp_path / "manifest.json")
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "internal error" not in r.stderr


def test_a_manifest_repeats_its_run_from_any_directory(cli, tiny_tokens, tmp_path, monkeypatch):
    """Recorded paths are absolute: `--config RUN/manifest.json` works from anywhere, for a path argument (train-lm's
    TOKENS) and a string one naming a file (train-diffusion's DATA)."""
    import shutil

    import numpy as np

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copytree(tiny_tokens, a / "tokens")
    np.save(a / "points.npy", np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    monkeypatch.chdir(a)
    assert cli("train-lm", "tokens", "-o", "lm", *FLAGS).exit_code == 0
    assert cli("train-diffusion", "points.npy", "-o", "dif", "--steps", "2", "--batch-size", "8", "--model", "mlp",
               "--width", "8", "--device", "cpu").exit_code == 0
    first = manifest(a / "lm")
    assert first["invocation"]["arguments"]["tokens"] == str((a / "tokens").absolute())
    monkeypatch.chdir(b)
    r = cli("train-lm", "-o", "again", "--config", "../a/lm/manifest.json")
    assert r.exit_code == 0, r.output
    assert manifest(b / "again")["fingerprint"] == first["fingerprint"]
    r = cli("train-diffusion", "-o", "dif2", "--config", "../a/dif")
    assert r.exit_code == 0, r.output
    assert manifest(b / "dif2")["fingerprint"] == manifest(a / "dif")["fingerprint"]
