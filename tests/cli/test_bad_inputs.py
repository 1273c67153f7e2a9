"""Every command against a table of bad inputs.

For each row: exit 1 or 2, one line on stderr without "internal error" or a traceback, nothing written (no output,
no temporary sibling), and every input unchanged (hashes before and after). A new command or option joins by
adding a row; a numeric option joins by declaring its range (`typer.Option(min=..., max=...)`), which
`test_numbers_out_of_range` exercises for every command, and `test_every_number_has_a_range` requires.
"""

from __future__ import annotations

import hashlib
import json
import os
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
        "nan": lambda d: _poke(d / "model.safetensors", float("nan")),
        "inf": lambda d: _poke(d / "model.safetensors", float("inf")),
        "fp16big": lambda d: _poke(d / "model.safetensors", 1e6),  # finite, but float16 stops at 65504
        # every weight fits float16, but the final norm's output does not: NaN logits in float16
        "fp16act": lambda d: _edit(d / "model.safetensors", lambda t: t["model.norm.weight"].fill_(60000.0)),
        "missing": lambda d: _edit(d / "model.safetensors", lambda t: t.pop("model.norm.weight")),
        "extra": lambda d: _edit(d / "model.safetensors", lambda t: t.update(extra=t["model.norm.weight"].clone())),
        "heads0": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "num_attention_heads": 0})),
        "dupkey": lambda d: _duplicate_key(d / "model.safetensors"),
        "truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]),
        "configlist": lambda d: (d / "config.json").write_text("[1, 2]"),
        "configjunk": lambda d: (d / "config.json").write_text("{not json"),
        "pickle": lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
    }.items():
        shutil.copytree(hf, w / f"hf-{name}")
        damage(w / f"hf-{name}")
        bad[name] = w / f"hf-{name}"
    ok("export-gguf", hf, "-o", w / "nan.gguf", "--type", "f32")
    _poke_gguf(w / "nan.gguf", "blk.0.ffn_up.weight", float("nan"))
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
    (w / "unrelated.txt").write_text("someone's file\n")
    os.link(w / "text.txt", w / "text-link.txt")  # another name of an input
    (w / "pics.png").mkdir()
    ok("export-gguf", w / "lm", "-o", w / "lm.gguf")
    _tasks(w)
    shutil.copytree(w / "lm", w / "lm-badmetrics")   # metrics.jsonl lines that are JSON but not objects
    with open(w / "lm-badmetrics" / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n3\n")
    (w / "recipe-bool.toml").write_text("lr = true\n")  # click would train at lr 1.0
    (w / "badinvocation").mkdir()
    (w / "badinvocation" / "manifest.json").write_text(json.dumps(
        {"format": "gentool.lm-checkpoint", "invocation": {"command": "train-lm", "options": {"steps": "three"}}}))
    shutil.copytree(tiny_tokenizer, w / "tok-changed")  # shards encoded with it, then the tokenizer retrained in place
    ok("tokenize", "encode", w / "text.txt", "--tokenizer", w / "tok-changed", "-o", w / "tokens-changed",
       "--val-fraction", "0", "--workers", "1")
    (w / "tok-changed" / "tokenizer.model").write_bytes((w / "tok-changed" / "tokenizer.model").read_bytes() + b"\0")
    _post_training_inputs(w, ok)
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


def _post_training_inputs(w: Path, ok) -> None:
    """Chat and preference JSONL (good and bad), an HF tokenizer with a ChatML template and one whose template
    fails, and example shards of each kind."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def jsonl(name, rows):
        (w / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    chat = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "To be, or not to be."}]
    jsonl("chat.jsonl", [{"messages": chat}] * 4)
    jsonl("chat-no-assistant.jsonl", [{"messages": chat}, {"messages": chat[:1]}])
    jsonl("chat-bad-role.jsonl", [{"messages": [{"role": "narrator", "content": "x"}] + chat}])
    jsonl("pref.jsonl", [{"prompt": "Speak. ", "chosen": "To be.", "rejected": "Not to be."}] * 4)
    jsonl("pref-empty.jsonl", [{"prompt": "Speak. ", "chosen": "To be.", "rejected": " "}])
    jsonl("pref-same.jsonl", [{"prompt": "Speak. ", "chosen": "To be.", "rejected": "To be."}])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["To be, or not to be. Speak."], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    for name, template in (("hftok", chatml), ("hftok-broken", "{{ messages[0]['content'] + 1 }}")):
        (w / name).mkdir()
        tok.save(str(w / name / "tokenizer.json"))
        (w / name / "tokenizer_config.json").write_text(json.dumps({"chat_template": template,
                                                                     "eos_token": "<|im_end|>"}))
    ok("tokenize", "encode", w / "chat.jsonl", "--tokenizer", w / "tok", "-o", w / "sft", "--val-fraction", "0")
    ok("tokenize", "encode", w / "chat.jsonl", "--tokenizer", w / "hftok", "-o", w / "sft-hf", "--val-fraction", "0")
    ok("tokenize", "encode", w / "pref.jsonl", "--tokenizer", w / "tok", "-o", w / "pairs", "--val-fraction", "0")


def _edit(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    change(t)
    save_file(t, str(path))


def _poke(path: Path, value: float) -> None:
    def change(t):
        t[next(k for k in t if k.endswith("mlp.up_proj.weight"))][0, 0] = value

    _edit(path, change)


def _poke_gguf(path: Path, name: str, value: float) -> None:
    """Overwrite the first float32 of a GGUF tensor in place."""
    import gguf

    at = next(t.data_offset for t in gguf.GGUFReader(path).tensors if t.name == name)
    data = bytearray(path.read_bytes())
    data[at:at + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))


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
    ("lora-merge-missing-tensor", "lora-merge {hf-missing} {ada} -o {out} --ignore-base-mismatch"),
    ("lora-merge-extra-tensor", "lora-merge {hf-extra} {ada} -o {out} --ignore-base-mismatch"),
    ("lora-merge-heads-zero", "lora-merge {hf-heads0} {ada} -o {out} --ignore-base-mismatch"),
    ("lora-merge-fp16-overflow", "lora-merge {hf-fp16big} {ada} -o {out} --dtype float16 --ignore-base-mismatch"),
    ("lora-extract-missing-tensor", "lora-extract {hf-missing} {lm} -o {out} --rank 1"),
    ("export-gguf-nan-weights", "export-gguf {hf-nan} -o {out}.gguf"),
    ("export-gguf-inf-weights", "export-gguf {hf-inf} -o {out}.gguf"),
    ("export-gguf-duplicate-key", "export-gguf {hf-dupkey} -o {out}.gguf"),
    ("export-gguf-truncated", "export-gguf {hf-truncated} -o {out}.gguf"),
    ("export-gguf-missing-tensor", "export-gguf {hf-missing} -o {out}.gguf"),
    ("export-gguf-extra-tensor", "export-gguf {hf-extra} -o {out}.gguf"),
    ("export-gguf-heads-zero", "export-gguf {hf-heads0} -o {out}.gguf"),
    ("export-gguf-fp16-overflow", "export-gguf {hf-fp16big} -o {out}.gguf"),
    ("export-gguf-q4-scale-overflow", "export-gguf {hf-fp16big} -o {out}.gguf --type q4_0"),
    ("quantize-q4-scale-overflow", "quantize {hf-fp16big} --scheme q4_0 -o {out}"),
    ("perplexity-fp16-overflow", "perplexity {hf-fp16big} {text} --dtype float16"),
    ("sample-fp16-overflow", "sample {hf-fp16big} -p hi --dtype float16 --max-new-tokens 2"),
    ("perplexity-llamacpp-shorter-than-window", "perplexity {lm} {unrelated} --protocol llama.cpp --window 32"),
    ("perplexity-reference-fp16-activations", "perplexity {hf-fp16act} {text} --reference {hf} --dtype float16"),
    ("quantize-eval-fp16-activations", "quantize {hf-fp16act} --scheme int8 -o {out} --eval {text} --dtype float16"),
    ("evaluate-fp16-activations", "evaluate {hf-fp16act} {task-ok.yaml} --dtype float16 -o {out}"),
    ("perplexity-heads-zero", "perplexity {hf-heads0} {text}"),
    ("import-gguf-nan-weights", "import-gguf {nan.gguf} -o {out}"),
    ("import-gguf-nan-weights-kept", "import-gguf {nan.gguf} -o {out} --keep-quantized"),
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
    ("perplexity-reference-stride-over-window", "perplexity {q8} {text} --reference {lm} --window 16 --stride 100"),
    ("perplexity-reference-stride-over-default-window", "perplexity {q8} {text} --reference {lm} --stride 100"),
    ("perplexity-reference-hf-strided-stride-over-window",
     "perplexity {q8} {text} --reference {lm} --protocol hf-strided --window 16 --stride 17"),
    ("perplexity-reference-llamacpp-stride-over-window",
     "perplexity {q8} {text} --reference {lm} --protocol llama.cpp --window 16 --stride 17"),
    ("perplexity-llamacpp-stride-over-window", "perplexity {lm} {text} --protocol llama.cpp --window 16 --stride 17"),
    ("perplexity-reference-unknown-protocol", "perplexity {q8} {text} --reference {lm} --protocol x"),
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
    ("quantize-output-tensor-type", "quantize {lm} --scheme q2_k --output-tensor-type iq2_xxs -o {out}"),
    ("quantize-pure-int8", "quantize {lm} --scheme int8 --pure -o {out}"),
    ("quantize-int8-head-ggml-type", "quantize {lm} --scheme int8 --output-tensor-type q8_0 -o {out}"),
    ("quantize-head-skipped-and-typed", "quantize {lm} --scheme int4 --skip lm_head --output-tensor-type int8 "
                                        "-o {out}"),
    ("recipe-unknown-key", "train-lm {tokens} -o {out} --config {recipe-bad}"),
    ("recipe-wrong-type", "train-diffusion builtin:moons -o {out} --steps 2 --config {recipe-bool.toml}"),
    ("recipe-manifest-wrong-type", "train-lm -o {out} --config {badinvocation}"),
    ("train-diffusion-lr-zero", "train-diffusion builtin:moons -o {out} --steps 2 --lr 0"),
    ("train-diffusion-lm-lr-zero", "train-diffusion {tokens} -o {out} --steps 1 --lr 0"),
    ("train-diffusion-lr-inf", "train-diffusion builtin:moons -o {out} --steps 2 --lr inf"),
    ("train-lm-lr-inf", "train-lm {tokens} -o {out} --steps 1 --lr inf"),
    ("train-lm-tokenizer-changed", "train-lm {tokens-changed} -o {out} --steps 1 --preset tiny --seq-len 16"),
    ("encode-checkpoint-without-tokenizer", "tokenize encode {text} --tokenizer {moons} -o {out}"),
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
    ("compare-lm-beside-diffusion", "compare {lm} {mdlm}"),
    ("compare-lm-beside-image-diffusion", "compare {lm} {moons}"),
    ("compare-non-object-metrics", "compare {lm-badmetrics}"),
    ("compare-plot-not-an-image", "compare {lm} --plot {out}.txt"),
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
    # side outputs get the output's checks
    ("kl-tokens-onto-eval", "quantize {lm} --scheme int8 -o {out} --eval {text} --kl-tokens {text} --force"),
    ("kl-tokens-onto-model", "quantize {lm} --scheme int8 -o {out} --eval {text} --kl-tokens {lm}/model.safetensors "
                             "--force"),
    ("kl-tokens-hard-link-of-eval", "quantize {lm} --scheme int8 -o {out} --eval {text} --kl-tokens {text-link} "
                                    "--force"),
    ("kl-tokens-exists", "quantize {lm} --scheme int8 -o {out} --eval {text} --kl-tokens {unrelated}"),
    ("kl-tokens-into-output", "quantize {lm} --scheme int8 -o {out} --eval {text} --kl-tokens {out}/kl.jsonl"),
    ("kl-tokens-directory", "quantize {lm} --scheme int8 -o {out} --eval {text} --kl-tokens {tok} --force"),
    ("plot-into-run", "compare {lm} --plot {lm}/p.png"),
    ("plot-onto-directory", "compare {lm} --plot {pics.png}"),
    ("plot-no-parent", "compare {lm} --plot {w}/nope/p.png"),
    # output paths that cannot be an output
    ("export-gguf-onto-directory", "export-gguf {lm} -o {tok} --force"),
    ("export-gguf-dot", "export-gguf {lm} -o . --force"),
    ("quantize-onto-file", "quantize {lm} --scheme int8 -o {unrelated} --force"),
    ("import-gguf-onto-hard-link", "import-gguf {lm.gguf} -o {text-link} --force"),
    ("quantize-parent-is-file", "quantize {lm} --scheme int8 -o {unrelated}/q8"),
    ("train-lm-dotdot", "train-lm {tokens} -o .. --force --steps 1 --seq-len 32 --micro-batch 2"),
    ("train-lm-cwd", "train-lm {tokens} -o {here} --force --steps 1"),
    ("train-diffusion-dotdot", "train-diffusion builtin:moons -o .. --force --steps 1"),
    ("lora-merge-dotdot", "lora-merge {lm} {ada} -o .. --force"),
    ("scale-fit-dotdot", "scale-fit {log} --form power --x flops --y loss -o .. --force"),
    *[(f"{cmd.split()[0]}{'-' + cmd.split()[1] if cmd.startswith('tokenize') else ''}-output-{name}",
       f"{cmd} -o {arg} --force")
      for name, arg in (("empty", "''"), ("dot", "."))
      for cmd in ("train-lm {tokens} --steps 1", "train-diffusion builtin:moons --steps 1", "sample {moons}",
                  "quantize {lm} --scheme int8", "tokenize train {text}", "tokenize encode {text} --tokenizer {tok}",
                  "lora-merge {lm} {ada}", "lora-extract {lm} {lm}", "lora-resize {ada}", "import-gguf {binary}",
                  "export-gguf {lm}", "scale-fit {log} --form power --x flops --y loss",
                  "evaluate {lm} {task-ok.yaml}")],
    ("evaluate-task-missing-field", "evaluate {lm} {task-nofield.yaml} -o {out}"),
    ("evaluate-template-fails-on-row", "evaluate {lm} {task-badtemplate.yaml} -o {out}"),
    ("evaluate-empty-split", "evaluate {lm} {task-emptysplit.yaml} -o {out}"),
    ("evaluate-one-choice", "evaluate {lm} {task-onechoice.yaml} -o {out}"),
    ("evaluate-too-many-shots", "evaluate {lm} {task-ok.yaml} --num-fewshot 9 -o {out}"),
    ("evaluate-missing-task", "evaluate {lm} {w}/nope.yaml -o {out}"),
    ("evaluate-tokenizer-as-model", "evaluate {tok} {task-ok.yaml} -o {out}"),
    ("evaluate-onto-input", "evaluate {lm} {task-ok.yaml} -o {lm} --force"),
    # post-training data and objectives
    ("chat-without-assistant", "tokenize encode {chat-no-assistant.jsonl} --tokenizer {tok} -o {out}"),
    ("chat-unknown-role", "tokenize encode {chat-bad-role.jsonl} --tokenizer {tok} -o {out}"),
    ("preference-empty-rejected", "tokenize encode {pref-empty.jsonl} --tokenizer {tok} -o {out}"),
    ("preference-identical", "tokenize encode {pref-same.jsonl} --tokenizer {tok} -o {out}"),
    ("chat-template-fails", "tokenize encode {chat.jsonl} --tokenizer {hftok-broken} -o {out}"),
    ("chat-train-on-completion", "tokenize encode {chat.jsonl} --tokenizer {tok} -o {out} --train-on completion"),
    ("text-with-max-len", "tokenize encode {text} --tokenizer {tok} -o {out} --max-len 64"),
    ("chat-as-text-with-overlong", "tokenize encode {chat.jsonl} --format text --tokenizer {tok} -o {out} "
                                   "--overlong drop --train-on all"),
    ("sft-checkpoint-tokenizer-differs", "train-lm {sft-hf} -o {out} --init-from {lm} --steps 1 --seq-len 32"),
    ("dpo-on-text-shards", "train-lm {tokens} -o {out} --init-from {lm} --objective dpo --steps 1"),
    ("pairs-without-objective", "train-lm {pairs} -o {out} --init-from {lm} --steps 1"),
    ("dpo-beta-zero", "train-lm {pairs} -o {out} --init-from {lm} --objective dpo --beta 0 --steps 1"),
    ("evaluate-tokenizer-cannot-encode", "evaluate {hf-wordlevel} {task-ok.yaml} -o {out}"),
    # misuse
    ("resume-nothing", "train-lm {tokens} -o {out} --steps 1 --resume"),
    ("lora-rank-without-base", "train-lm {tokens} -o {out} --steps 1 --lora-rank 4"),
]


def _argv(template: str, world: Path, out: Path) -> list[str]:
    names = {p.name: p for p in world.iterdir()}
    names.update({"w": world, "out": out, "text": world / "text.txt", "empty": world / "empty.txt",
                  "binary": world / "binary.bin", "log": world / "log.csv", "same": world / "same.csv",
                  "recipe-bad": world / "recipe-bad.toml", "unrelated": world / "unrelated.txt",
                  "text-link": world / "text-link.txt", "here": Path.cwd()})
    args = []
    for word in template.split():
        if word == "''":  # an empty argument
            args.append("")
            continue
        for key in sorted(names, key=len, reverse=True):
            word = word.replace("{" + key + "}", str(names[key]))
        args.append(word)
    return args


def _check(cli, world, tmp_path, template, stdin=None):
    before = _tree(world)
    out = tmp_path / "out"
    here = tmp_path / "cwd"  # the working directory: "-o ." and "-o .." must leave it (and its parent) alone
    here.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(here)
    try:
        r = cli(*_argv(template, world, out), input=stdin)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and not list(here.iterdir()), template
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code in (1, 2), (template, r.exit_code, r.output)
    # one error line, the last one (warnings and progress may come before it)
    assert err and err[-1].startswith("error: ") and sum(e.startswith("error: ") for e in err) == 1, \
        (template, r.stderr)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not Path(f"{out}.gguf").exists(), template
    assert _tree(world) == before, f"{template}: an input changed"
    return r


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
    """A full disk: one line naming the directory, nothing half-written, and a training run resumable."""
    import errno

    import gguf

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("gentool.artifacts.store.replace_dir", full)
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
        for template in ("quantize {lm} --scheme int8 -o {out}", "tokenize encode {text} --tokenizer {tok} -o {out}",
                         "lora-merge {lm} {ada} -o {out}", "quantize {q8} --dequantize -o {out}",
                         "sample {moons} -o {out} --num-samples 8 --steps 2", "export-gguf {lm} -o {out}.gguf",
                         "export-gguf {ada} --adapter-of {lm} -o {out}.gguf"):
            r = _check(cli, world, tmp_path, template)
            assert f"no space left on {tmp_path}" in r.stderr, (template, r.stderr)
        train = "train-lm {tokens} -o {out} --preset tiny --steps 2 --seq-len 32 --micro-batch 2"
        r = cli(*_argv(train, world, tmp_path / "out"))
        assert r.exit_code == 1 and f"no space left on {tmp_path}" in r.stderr and "--resume" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "state").is_dir()
    r = cli(*_argv(train + " --resume", world, tmp_path / "out"))  # once there is room
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"]
    torch.manual_seed(0)


def test_stale_temporaries_of_a_killed_export_are_swept(cli, world, tmp_path):
    """`export-gguf` killed with -9 leaves .X.gguf.tmp-PID-HEX; the next export of X removes it (its process is
    gone), and --force over a hard link leaves no .old- copy."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that no process has now
    stale = tmp_path / f".m.gguf.tmp-{p.pid}-0123abcd"
    stale.write_bytes(b"GGUF half written")
    (tmp_path / "keep.gguf").write_bytes(b"another name")
    os.link(tmp_path / "keep.gguf", tmp_path / "m.gguf")
    r = cli("export-gguf", world / "lm", "-o", tmp_path / "m.gguf", "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf", "m.gguf"]
    assert (tmp_path / "keep.gguf").read_bytes() == b"another name"
    stale = tmp_path / f".art.old-{p.pid}-0123abcd"
    stale.mkdir()
    for _ in range(2):
        r = cli("import-gguf", tmp_path / "m.gguf", "-o", tmp_path / "art", "--force")
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "keep.gguf", "m.gguf"]
