"""A fresh install of gentool (with or without an extra) has what its commands import.

Installing here would need the network, so each command runs in a process where every installed package that a
fresh `pip install gentool[EXTRA]` would not bring is hidden: its imports fail as if it were absent. The set comes
from pyproject.toml (gentool's own requirements) and the installed metadata (theirs, transitively)."""

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIDE = textwrap.dedent('''
    import importlib.machinery as mach, importlib.metadata as md, json, re, sys
    from packaging.requirements import Requirement
    allowed, extras = set(), json.loads(sys.argv[1])
    todo = [Requirement(r) for r in json.loads(sys.argv[2])]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras or [""]):
            continue
        if name in allowed:
            continue
        allowed.add(name)
        try:
            todo += [Requirement(r) for r in (md.requires(req.name) or []) if "extra ==" not in r]
        except md.PackageNotFoundError:
            pass
    hidden = {top for top, dists in md.packages_distributions().items()
              if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed | {"gentool"} for d in dists)}

    class Installed(mach.PathFinder):  # what a fresh install would have on sys.path: not the hidden packages
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.split(".")[0] in hidden else super().find_spec(name, path, target)

    sys.meta_path[sys.meta_path.index(mach.PathFinder)] = Installed
    sys.argv = ["gentool", *sys.argv[3:]]
    from gentool.cli import main
    main()
''')


def requirements(*extras):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for e in extras:
        reqs += project["optional-dependencies"][e]
    return reqs


def gentool(extras, *args):
    return subprocess.run([sys.executable, "-c", HIDE, json.dumps(list(extras)), json.dumps(requirements(*extras)),
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_tokenizer):
    from gentool.config import config_from_preset
    from gentool.models.checkpoint import save_lm
    from gentool.models.transformer import Transformer

    d = tmp_path_factory.mktemp("fresh") / "lm"
    d.mkdir()
    cfg = config_from_preset("tiny", vocab_size=400, max_position_embeddings=64)
    save_lm(Transformer(cfg), cfg, d)
    (d / "tokenizer.model").write_bytes((tiny_tokenizer / "tokenizer.model").read_bytes())
    return d


def test_the_hiding_works(lm, tmp_path):
    r = gentool([], "export-gguf", lm, "-o", tmp_path / "x.gguf")  # the gguf package is not in a plain install
    assert r.returncode == 2 and "pip install 'gentool[gguf]'" in r.stderr and not (tmp_path / "x.gguf").exists()


def test_a_plain_install_runs_the_core_commands(lm, tmp_path):
    for args in (["perplexity", lm, "-", "--device", "cpu"], ["sample", lm, "-p", "To be", "--max-new-tokens", "3",
                                                                "--device", "cpu"],
                 ["quantize", lm, "--scheme", "int8", "-o", tmp_path / "q"]):
        r = subprocess.run([sys.executable, "-c", HIDE, "[]", json.dumps(requirements()), *map(str, args)],
                           input="Now is the winter of our discontent", capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, (args, r.stderr)


def test_the_gguf_extra_runs_export_and_import(lm, tmp_path):
    r = gentool(["gguf"], "export-gguf", lm, "-o", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr
    r = gentool(["gguf"], "import-gguf", tmp_path / "m.gguf", "-o", tmp_path / "back")
    assert r.returncode == 0, r.stderr


def test_the_plot_extra_draws_scale_fit_plots(tmp_path):
    rows = ["flops,loss"] + [f"{c:g},{2.0 + 30 * c ** -0.2:.6f}" for c in (1e12, 3e12, 1e13, 3e13, 1e14, 3e14)]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    r = gentool(["plot"], "scale-fit", tmp_path / "runs.csv", "--form", "power", "--x", "flops", "--y", "loss",
                "-o", tmp_path / "fit", "--bootstrap", "20")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fit" / "plot.png").is_file()
