"""Batch-1 decoding: gentool's static-cache decode step (on CUDA the whole step, sampling included, is one CUDA
graph) vs transformers' generate on the same weights, against the memory-bandwidth roofline: non-embedding
weight bytes / measured copy bandwidth (bytes read + written per second by a large device copy). Random weights.

    python bench/sample.py --device cuda    # 1.1B (TinyLlama shape) and 7B (Llama-2 shape), bf16
    python bench/sample.py --device cpu     # a small shape, fp32
    python bench/sample.py --device cuda --shapes tinyllama-1.1b --general   # also the unfused forward
"""

import time

import torch

from _common import device_name, parser, sync, table

from gentool.config import config_from_preset
from gentool.lm.sample import Generator, SamplingParams, benchmark, decode_weight_bytes, measure_copy_bandwidth
from gentool.models.transformer import Transformer

PROMPT = [1] + [5] * 15


class _IdTok:
    """A tokenizer stand-in: prompts are given as ids; decoded text is not needed for timing."""
    bos_id, eos_id, pad_id, eos_ids, add_bos = 1, 2, 0, {2}, True

    def decode(self, ids):
        return ""


def build(name: str, dev: str, dtype):
    extra = dict(vocab_size=4096) if name in ("small", "base") else {}
    cfg = config_from_preset(name, max_position_embeddings=2048, **extra)
    with torch.device(dev):
        m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.to(dtype).eval(), cfg


def transformers_generate(model, cfg, dev, dtype, new_tokens):
    import transformers

    hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                       if k not in ("architectures", "dtype", "torch_dtype")})
    with torch.device(dev):
        hf = transformers.LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa", dtype=dtype)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.eval()
    ids = torch.tensor([PROMPT], device=dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, **{**kw, "max_new_tokens": 10, "min_new_tokens": 10})
        sync(dev)
        t0 = time.perf_counter()
        hf.generate(ids, **kw)
        sync(dev)
    del hf
    return new_tokens / (time.perf_counter() - t0)


def main():
    p = parser(__doc__)
    p.add_argument("--shapes", default=None, help="presets, comma-separated")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--general", action="store_true", help="also time the unfused forward (Transformer.forward)")
    p.add_argument("--no-transformers", action="store_true")
    args = p.parse_args()
    dev = args.device
    gpu = dev.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = (args.shapes or ("tinyllama-1.1b,llama2-7b" if gpu else "small,base")).split(",")
    bw = measure_copy_bandwidth(dev)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    rows = []
    for shape in shapes:
        model, cfg = build(shape, dev, dtype)
        weight_bytes = decode_weight_bytes(model)
        roof = bw / weight_bytes
        row = {"shape": shape, "weights GB": weight_bytes / 1e9, "roofline tok/s": roof}
        if not args.no_transformers:
            try:
                row["transformers tok/s"] = transformers_generate(model, cfg, dev, dtype, args.new_tokens)
            except ImportError:
                pass
        variants = [("gentool", None)] + ([("gentool unfused", False)] if args.general else [])
        for label, fuse in variants:
            model.reset_cache()
            gen = Generator(model, _IdTok(), device=dev, fuse=fuse)
            ours = benchmark(gen, params, PROMPT, bandwidth=bw)["tokens_per_s"]
            row[f"{label} tok/s"] = ours
            row[f"{label} % roofline"] = 100 * ours / roof
            if "transformers tok/s" in row:
                row[f"{label} / transformers"] = ours / row["transformers tok/s"]
            del gen
        rows.append(row)
        del model
        if gpu:
            torch.cuda.empty_cache()
    table(f"batch-1 decode, {device_name(dev)}, {str(dtype).replace('torch.', '')}, {args.new_tokens} new tokens "
          f"after {len(PROMPT)}; measured copy bandwidth {bw / 1e9:,.0f} GB/s (read + write)", rows)


if __name__ == "__main__":
    main()
