"""Scoring throughput: gentool perplexity's forward vs a plain transformers forward, same weights and batch.

    python bench/perplexity.py --device cuda   # 1.1B shape, batch 8 x 2048, bf16
    python bench/perplexity.py --device cpu    # a small shape
"""

import torch
import torch.nn.functional as F

from _common import device_name, matmul_peak, parser, table, timed

from gentool.config import config_from_preset
from gentool.lm.perplexity import token_nlls
from gentool.models.transformer import Transformer


def main():
    p = parser(__doc__)
    p.add_argument("--compile", action="store_true", default=None)
    args = p.parse_args()
    dev = args.device
    gpu = dev.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        cfg, batch, seq = config_from_preset("tinyllama-1.1b"), 8, 2048
    else:
        cfg, batch, seq = config_from_preset("small", vocab_size=4096, max_position_embeddings=256), 4, 256
    with torch.device(dev):
        model = Transformer(cfg)
    model.init_weights(0) if not gpu else [q.data.normal_(0, 0.02) for q in model.parameters()]
    model = model.to(dtype).eval()
    peak = matmul_peak(dev)
    ids = torch.randint(0, cfg.vocab_size, (batch * seq,))
    flops_tok = 2 * cfg.n_params()  # forward only
    rows = []
    fwd = torch.compile(model) if (args.compile if args.compile is not None else gpu) else model

    def ours():
        token_nlls(fwd, ids, window=seq, stride=seq - 1, batch_size=batch, device=dev, dtype=dtype)

    with torch.no_grad():
        sec = timed(ours, dev, warmup=2, reps=5)
    tokens = len(ids) - 1  # the scorer packs windows with one token of overlap, so it scores a little less
    rows.append({"scorer": "gentool perplexity", "tokens/s": tokens / sec, "MFU": tokens / sec * flops_tok / peak})
    try:
        import transformers

        hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                           if k not in ("architectures", "dtype", "torch_dtype")})
        with torch.device(dev):
            hf = transformers.LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa", dtype=dtype).eval()
        hf.load_state_dict(model.state_dict(), strict=False)
        x = ids.view(batch, seq).to(dev)

        def ref():
            logits = hf(x).logits
            F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())

        with torch.no_grad():
            sec_ref = timed(ref, dev, warmup=2, reps=5)
        rows.append({"scorer": "transformers forward + loss", "tokens/s": batch * (seq - 1) / sec_ref,
                     "MFU": batch * (seq - 1) / sec_ref * flops_tok / peak})
        for r in rows:
            r["vs transformers"] = r["tokens/s"] / rows[-1]["tokens/s"]
    except ImportError:
        pass
    table(f"perplexity throughput, {device_name(dev)}, d{cfg.hidden_size} x{cfg.num_hidden_layers}, batch {batch} x "
          f"{seq}, {str(dtype).replace('torch.', '')}; MFU of measured matmul peak {peak / 1e12:.1f} TFLOP/s", rows)


if __name__ == "__main__":
    main()
