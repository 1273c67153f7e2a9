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
