"""Batch-1 decoding: gentool's static-cache decode (CUDA-graphed on GPU) vs transformers' generate, against the
memory-bandwidth roofline (non-embedding weight bytes / measured copy read bandwidth). Random weights.

    python bench/sample.py --device cuda    # 1.1B (TinyLlama shape) and 7B (Llama-2 shape), bf16
    python bench/sample.py --device cpu     # a small shape, fp32
"""

import time

import torch

from _common import copy_bandwidth, device_name, parser, sync, table

from gentool.config import config_from_preset
from gentool.lm.sample import Generator, SamplingParams
from gentool.models.transformer import Transformer


class _IdTok:
    """A tokenizer stand-in: the prompt is a fixed list of ids, decode is never needed for timing."""
    bos_id, eos_id, eos_ids, add_bos = 1, None, set(), True

    def encode(self, text, bos=False, eos=False):
        return [1] + [5] * 15

    def decode(self, ids):
        return ""


def build(name: str, dev: str, dtype):
    cfg = config_from_preset(name) if name != "small" else config_from_preset("small", vocab_size=4096,
                                                                              max_position_embeddings=512)
    cfg.max_position_embeddings = 512
    with torch.device(dev):
        m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.to(dtype).eval(), cfg


def main():
    p = parser(__doc__)
    p.add_argument("--shapes", default=None)
    p.add_argument("--new-tokens", type=int, default=200)
    args = p.parse_args()
    dev = args.device
    gpu = dev.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = (args.shapes or ("tinyllama-1.1b,llama2-7b" if gpu else "small")).split(",")
    bw = copy_bandwidth(dev)
    rows = []
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    for shape in shapes:
        model, cfg = build(shape, dev, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
        roof = bw / weight_bytes
        gen = Generator(model, _IdTok(), device=dev)
        gen.generate("", SamplingParams(max_new_tokens=20, temperature=0))  # compile + capture
        gen.generate("", params)
        sync(dev)
        t0 = time.perf_counter()
        res = gen.generate("", params)
        sync(dev)
        ours = res[0].tokens / (time.perf_counter() - t0)
        row = {"shape": shape, "gentool tok/s": ours, "roofline tok/s": roof, "gentool % roofline": 100 * ours / roof}
        model.reset_cache()
        try:
            import transformers

            hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                               if k not in ("architectures", "dtype", "torch_dtype")})
            with torch.device(dev):
                hf = transformers.LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa", dtype=dtype)
            hf.load_state_dict(model.state_dict(), strict=False)
            hf.eval()
            ids = torch.tensor([_IdTok().encode("")], device=dev)
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            hf.generate(ids, **{**kw, "max_new_tokens": 10, "min_new_tokens": 10})
            sync(dev)
            t0 = time.perf_counter()
            hf.generate(ids, **kw)
            sync(dev)
            ref = args.new_tokens / (time.perf_counter() - t0)
            row.update({"transformers tok/s": ref, "gentool / transformers": ours / ref})
            del hf
        except ImportError:
            pass
        rows.append(row)
        del model, gen
        if gpu:
            torch.cuda.empty_cache()
    table(f"batch-1 decode, {device_name(dev)}, {str(dtype).replace('torch.', '')}, {args.new_tokens} new tokens; "
          f"measured copy read bandwidth {bw / 1e9:.0f} GB/s", rows)


if __name__ == "__main__":
    main()
