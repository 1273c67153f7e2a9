"""Every command against a table of bad inputs.

For each row: exit 1 or 2, one line on stderr without "internal error" or a traceback, nothing written (no output,
no temporary sibling), and every input unchanged (hashes before and after). A new command or option joins by
adding a row; a numeric option joins by declaring its range (`typer.Option(min=..., max=...)`), which
`test_numbers_out_of_range` exercises for every command, and `test_every_number_has_a_range` requires.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import typer.main

from gentool.cli import app

# Numeric options that take any value (or whose range is checked elsewhere, with the reason).
UNBOUNDED = {
    ("compare", "--target"),  # a loss or an accuracy: any number is a target
}


def _tree(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer, tiny_tokens):
    """Good and broken inputs for every command (read only: the tests check that nothing changes them)."""
    from typer.testing import CliRunner

    w = tmp_path_factory.mktemp("world")
    run = CliRunner().invoke

    def ok(*args):
        r = run(app, [str(a) for a in args])
        assert r.exit_code == 0, (args, r.output)

    ok("train-lm", tiny_tokens, "-o", w / "lm", "--preset", "tiny", "--steps", "2", "--seq-len", "32",
       "--micro-batch", "2", "--device", "cpu")
    ok("quantize", w / "lm", "--scheme", "int8", "-o", w / "q8")
    ok("train-lm", tiny_tokens, "-o", w / "ada", "--init-from", w / "lm", "--lora-rank", "2", "--steps", "1",
       "--seq-len", "32", "--micro-batch", "2", "--device", "cpu")
    ok("train-diffusion", "builtin:moons", "-o", w / "moons", "--steps", "2", "--batch-size", "16", "--model", "mlp",
       "--width", "16", "--device", "cpu")
    ok("train-diffusion", tiny_tokens, "-o", w / "mdlm", "--preset", "tiny", "--seq-len", "32", "--steps", "1",
       "--batch-size", "2", "--device", "cpu")
    shutil.copytree(tiny_tokenizer, w / "tok")
    shutil.copytree(tiny_tokens, w / "tokens")
    hf = w / "hf"  # a Hugging Face directory: no manifest to vouch for it
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json"):
        shutil.copy(w / "lm" / name, hf / name)
    bad = {}
    for name, damage in {
        "nan": lambda d: _poke_nan(d / "model.safetensors"),
        "dupkey": lambda d: _duplicate_key(d / "model.safetensors"),
        "truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]),
        "configlist": lambda d: (d / "config.json").write_text("[1, 2]"),
        "configjunk": lambda d: (d / "config.json").write_text("{not json"),
        "pickle": lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
    }.items():
        shutil.copytree(hf, w / f"hf-{name}")
        damage(w / f"hf-{name}")
        bad[name] = w / f"hf-{name}"
    shutil.copytree(w / "lm", w / "lm-badmanifest")
    (w / "lm-badmanifest" / "manifest.json").write_text("{garbage")
    shutil.copytree(w / "lm", w / "lm-tampered")
    (w / "lm-tampered" / "tokenizer.model").write_bytes(b"tampered")
    (w / "empty.txt").write_text("")
    (w / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (w / "text.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York.\n" * 8)
    (w / "log.csv").write_text("flops,loss\n" + "".join(f"{c:g},{2 + 30 * c ** -0.2:.5f}\n"
                                                        for c in (1e12, 3e12, 1e13, 3e13, 1e14)))
    (w / "same.csv").write_text("flops,loss\n" + "1e12,3.0\n" * 6)
    (w / "recipe-bad.toml").write_text("stepz = 3\n")
    _tasks(w)
    return w


def _tasks(w: Path) -> None:
    """evaluate's task files: a good multiple-choice task and one broken way per row."""
    rows = [{"q": f"Line {i}", "choices": ["yes", "no"], "label": i % 2} for i in range(4)]
    (w / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (w / "mc-one-choice.jsonl").write_text(json.dumps({"q": "x", "choices": ["only"], "label": 0}) + "\n")
    (w / "mc-empty.jsonl").write_text("")
    base = ("output_type: multiple_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\ndoc_to_text: \"{text}\"\ndoc_to_choice: choices\ndoc_to_target: label\n")
    for name, data, text in (("task-ok", "mc.jsonl", "{{q}}"), ("task-badtemplate", "mc.jsonl", "{{nope}}"),
                             ("task-onechoice", "mc-one-choice.jsonl", "{{q}}"),
                             ("task-emptysplit", "mc-empty.jsonl", "{{q}}")):
        (w / f"{name}.yaml").write_text(base.format(data=w / data, text=text))
    (w / "task-nofield.yaml").write_text(base.format(data=w / "mc.jsonl", text="{{q}}").replace(
        "doc_to_choice: choices\n", ""))
    # an HF model directory whose tokenizer.json (WordLevel, no [UNK] in its vocabulary) cannot encode "0".."3"
    (w / "hf-wordlevel").mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(w / "hf" / name, w / "hf-wordlevel" / name)
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "Line", "yes", "no"])}
    (w / "hf-wordlevel" / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}))
    (w / "hf-wordlevel" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def _poke_nan(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    key = next(k for k in t if k.endswith("mlp.up_proj.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, str(path))


def _duplicate_key(path: Path) -> None:
    """Name one tensor twice in the header (safetensors' own reader keeps the second entry silently)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode().rstrip()
    first = json.loads(header)
    name = next(k for k in first if k != "__metadata__")
    extra = f', "{name}": {json.dumps(first[name])}'
    new = (header[:-1] + extra + "}").encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


# (id, argv with {placeholders}: a path in the world, {out} a fresh output path)
ROWS = [
    # wrong kinds and missing paths
    ("perplexity-tokenizer-as-model", "perplexity {tok} {tokens}"),
    ("perplexity-missing-model", "perplexity {w}/nope {tokens}"),
    ("perplexity-tokens-as-model", "perplexity {tokens} {text}"),
    ("sample-shards-as-model", "sample {tokens} -p hi"),
    ("quantize-adapter", "quantize {ada} --scheme int8 -o {out}"),
    ("quantize-quantized", "quantize {q8} --scheme int8 -o {out}"),
    ("train-lm-tokenizer-as-data", "train-lm {tok} -o {out} --steps 1"),
    ("train-lm-missing-data", "train-lm {w}/nope -o {out} --steps 1"),
    ("lora-merge-adapter-as-base", "lora-merge {ada} {ada} -o {out}"),
    ("lora-merge-tokenizer-as-adapter", "lora-merge {lm} {tok} -o {out}"),
    ("encode-shards-as-tokenizer", "tokenize encode {text} --tokenizer {tokens} -o {out}"),
    ("decode-model-as-shards", "tokenize decode {lm} --tokenizer {tok}"),
    ("export-gguf-adapter", "export-gguf {ada} -o {out}.gguf"),
    ("import-gguf-not-gguf", "import-gguf {text} -o {out}"),
    ("train-diffusion-missing-data", "train-diffusion {w}/nope.npy -o {out} --steps 1"),
    ("scale-fit-missing", "scale-fit {w}/nope.csv --form power --x flops --y loss"),
    # broken files
    ("perplexity-nan-weights", "perplexity {hf-nan} {text}"),
    ("sample-nan-weights", "sample {hf-nan} -p hi --max-new-tokens 2"),
    ("quantize-nan-weights", "quantize {hf-nan} --scheme int8 -o {out}"),
    ("perplexity-duplicate-key", "perplexity {hf-dupkey} {text}"),
    ("sample-truncated", "sample {hf-truncated} -p hi"),
    ("quantize-truncated", "quantize {hf-truncated} --scheme int8 -o {out}"),
    ("sample-config-list", "sample {hf-configlist} -p hi"),
    ("quantize-config-list", "quantize {hf-configlist} --scheme int8 -o {out}"),
    ("perplexity-config-junk", "perplexity {hf-configjunk} {text}"),
    ("perplexity-pickle-only", "perplexity {hf-pickle} {text}"),
    ("perplexity-bad-manifest", "perplexity {lm-badmanifest} {text}"),
    ("sample-tampered-artifact", "sample {lm-tampered} -p hi"),
    ("lora-merge-nan-base", "lora-merge {hf-nan} {ada} -o {out}"),
    # empty and binary data
    ("perplexity-empty-text", "perplexity {lm} {empty}"),
    ("perplexity-empty-stdin", "perplexity {lm} -", ""),
    ("sample-binary-stdin", "sample {lm} --max-new-tokens 2", b"\xff\xfe\x00\x80"),
    ("sample-binary-prompt-file", "sample {lm} --prompt-file {binary}"),
    ("tokenize-train-empty", "tokenize train {empty} -o {out}"),
    ("tokenize-encode-empty", "tokenize encode {empty} --tokenizer {tok} -o {out}"),
    ("perplexity-directory-as-text", "perplexity {lm} {w}"),
    ("scale-fit-identical-rows", "scale-fit {same} --form power --x flops --y loss -o {out}"),
    ("scale-fit-wrong-column", "scale-fit {log} --form power --x compute --y loss"),
    # out-of-range numbers that only the command can judge
    ("perplexity-stride-negative", "perplexity {lm} {text} --stride -5"),
    ("perplexity-stride-over-window", "perplexity {lm} {text} --window 16 --stride 100"),
    ("perplexity-window-over-context", "perplexity {lm} {text} --window 100000"),
    ("sample-too-many-tokens", "sample {lm} -p hi --max-new-tokens 100000"),
    ("decode-slice-negative", "tokenize decode {tokens} --tokenizer {tok} --start -5"),
    ("decode-slice-past-end", "tokenize decode {tokens} --tokenizer {tok} --start 100000000"),
    ("train-lm-warmup-negative", "train-lm {tokens} -o {out} --steps 2 --warmup -5"),
    ("train-lm-dtype", "train-lm {tokens} -o {out} --steps 2 --dtype int8"),
    ("train-diffusion-lr-negative", "train-diffusion builtin:moons -o {out} --steps 2 --lr -1"),
    ("sample-zero-samples", "sample {lm} -p hi --num-samples 0"),
    ("sample-diffusion-zero-samples", "sample {moons} --num-samples 0 -o {out}"),
    ("quantize-group-size", "quantize {lm} --scheme int4 --group-size 7 -o {out}"),
    ("recipe-unknown-key", "train-lm {tokens} -o {out} --config {recipe-bad}"),
    # an output that is, or nests in, an input
    ("quantize-onto-input", "quantize {lm} --scheme int8 -o {lm} --force"),
    ("quantize-into-input", "quantize {lm} --scheme int8 -o {lm}/q8 --force"),
    ("encode-onto-tokenizer", "tokenize encode {text} --tokenizer {tok} -o {tok} --force"),
    ("train-lm-onto-data", "train-lm {tokens} -o {tokens} --force --steps 1"),
    ("lora-merge-onto-adapter", "lora-merge {lm} {ada} -o {ada} --force"),
    ("sample-onto-model", "sample {moons} -o {moons} --force"),
    ("train-diffusion-onto-model", "train-diffusion builtin:moons -o {moons} --force --reflow-from {moons}"),
    # commands added in this push
    ("compare-missing-run", "compare {w}/nope"),
    ("compare-not-a-run", "compare {tok}"),
    ("lora-extract-adapter-as-base", "lora-extract {ada} {lm} -o {out}"),
    ("lora-extract-onto-input", "lora-extract {lm} {lm} -o {lm} --force"),
    ("lora-resize-model-as-adapter", "lora-resize {lm} -o {out}"),
    ("lora-resize-onto-input", "lora-resize {ada} -o {ada} --force"),
    ("block-lm-without-block-size", "train-diffusion {tokens} -o {out} --kind block-lm --steps 1"),
    ("block-size-on-vectors", "train-diffusion builtin:moons -o {out} --block-size 4 --steps 1"),
    ("block-size-not-dividing", "train-diffusion {tokens} -o {out} --block-size 7 --seq-len 32 --steps 1"),
    ("masked-lm-image-sampler", "sample {mdlm} --sampler ddim --max-new-tokens 4"),
    ("image-model-lm-sampler", "sample {moons} --sampler remdm -o {out}"),
    ("export-gguf-into-input", "export-gguf {lm} -o {lm}/lm.gguf"),
    ("scale-fit-onto-input", "scale-fit {log} --form power --x flops --y loss -o {log} --force"),
    ("evaluate-task-missing-field", "evaluate {lm} {task-nofield.yaml} -o {out}"),
    ("evaluate-template-fails-on-row", "evaluate {lm} {task-badtemplate.yaml} -o {out}"),
    ("evaluate-empty-split", "evaluate {lm} {task-emptysplit.yaml} -o {out}"),
    ("evaluate-one-choice", "evaluate {lm} {task-onechoice.yaml} -o {out}"),
    ("evaluate-too-many-shots", "evaluate {lm} {task-ok.yaml} --num-fewshot 9 -o {out}"),
    ("evaluate-missing-task", "evaluate {lm} {w}/nope.yaml -o {out}"),
    ("evaluate-tokenizer-as-model", "evaluate {tok} {task-ok.yaml} -o {out}"),
    ("evaluate-onto-input", "evaluate {lm} {task-ok.yaml} -o {lm} --force"),
    ("evaluate-tokenizer-cannot-encode", "evaluate {hf-wordlevel} {task-ok.yaml} -o {out}"),
    # misuse
    ("resume-nothing", "train-lm {tokens} -o {out} --steps 1 --resume"),
    ("lora-rank-without-base", "train-lm {tokens} -o {out} --steps 1 --lora-rank 4"),
]


def _argv(template: str, world: Path, out: Path) -> list[str]:
    names = {p.name: p for p in world.iterdir()}
    names.update({"w": world, "out": out, "text": world / "text.txt", "empty": world / "empty.txt",
                  "binary": world / "binary.bin", "log": world / "log.csv", "same": world / "same.csv",
                  "recipe-bad": world / "recipe-bad.toml"})
    args = []
    for word in template.split():
        for key in sorted(names, key=len, reverse=True):
            word = word.replace("{" + key + "}", str(names[key]))
        args.append(word)
    return args


def _check(cli, world, tmp_path, template, stdin=None):
    before = _tree(world)
    out = tmp_path / "out"
    r = cli(*_argv(template, world, out), input=stdin)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code in (1, 2), (template, r.exit_code, r.output)
    # one error line, the last one (warnings and progress may come before it)
    assert err and err[-1].startswith("error: ") and sum(e.startswith("error: ") for e in err) == 1, \
        (template, r.stderr)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not Path(f"{out}.gguf").exists(), template
    assert _tree(world) == before, f"{template}: an input changed"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(cli, world, tmp_path, row):
    _check(cli, world, tmp_path, row[1], row[2] if len(row) > 2 else None)


def _numbers():
    """(command words, option, type, min, max) of every numeric option of every command."""
    out = []

    def walk(cmd, path):
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, path + [name])
        if getattr(cmd, "commands", None) is None:
            for p in cmd.params:
                kind = getattr(getattr(p, "type_descriptor", None), "annotation", None)
                if p.param_type_name == "option" and kind in (int, float) and not getattr(p, "count", False):
                    out.append((" ".join(path), max(p.opts, key=len), kind, p.min, p.max))

    walk(typer.main.get_command(app), [])
    return out


# a minimal invocation per command, before the option under test is added
BASE = {"train-lm": "train-lm {tokens} -o {out}", "train-diffusion": "train-diffusion builtin:moons -o {out}",
        "sample": "sample {lm} -p hi", "perplexity": "perplexity {lm} {text}",
        "quantize": "quantize {lm} --scheme int4 -o {out}", "tokenize train": "tokenize train {text} -o {out}",
        "tokenize encode": "tokenize encode {text} --tokenizer {tok} -o {out}",
        "tokenize decode": "tokenize decode {tokens} --tokenizer {tok}", "lora-merge": "lora-merge {lm} {ada} -o {out}",
        "scale-fit": "scale-fit {log} --form power --x flops --y loss", "export-gguf": "export-gguf {lm} -o {out}.gguf",
        "import-gguf": "import-gguf {text} -o {out}", "compare": "compare {lm}",
        "lora-extract": "lora-extract {lm} {lm} -o {out}", "lora-resize": "lora-resize {ada} -o {out}"}


def test_every_number_has_a_range():
    missing = [f"{c} {o}" for c, o, _, lo, hi in _numbers() if lo is None and hi is None and (c, o) not in UNBOUNDED]
    assert not missing, "numeric options without a declared range (typer.Option(min=..)): " + ", ".join(missing)


@pytest.mark.parametrize("number", [n for n in _numbers() if n[3] is not None or n[4] is not None],
                         ids=lambda n: f"{n[0]} {n[1]}".replace(" ", "_"))
def test_numbers_out_of_range(cli, world, tmp_path, number):
    command, option, kind, lo, hi = number
    value = lo - 1 if lo is not None else hi + 1
    _check(cli, world, tmp_path, f"{BASE.get(command, command)} {option} {kind(value)}")


def test_full_disk_loses_nothing(cli, world, tmp_path, monkeypatch):
    import errno

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("gentool.artifacts.store.replace_dir", full)
    for template in ("quantize {lm} --scheme int8 -o {out}", "tokenize encode {text} --tokenizer {tok} -o {out}",
                     "lora-merge {lm} {ada} -o {out}", "quantize {q8} --dequantize -o {out}",
                     "sample {moons} -o {out} --num-samples 8 --steps 2"):
        _check(cli, world, tmp_path, template)
    r = cli(*_argv("train-lm {tokens} -o {out} --preset tiny --steps 2 --seq-len 32 --micro-batch 2", world,
                   tmp_path / "out"))
    assert r.exit_code == 1 and "No space left on device" in r.stderr and not (tmp_path / "out").exists()
    assert (tmp_path / "out.partial" / "state").is_dir()  # the run is resumable once there is room
    torch.manual_seed(0)
