"""CUDA paths: run on a GPU machine (skipped elsewhere)."""

import pytest
import torch

from gentool.config import config_from_preset
from gentool.models.transformer import Transformer

pytestmark = pytest.mark.cuda


class _Tok:
    bos_id, eos_id, eos_ids, add_bos = 1, None, set(), True

    def encode(self, text, bos=False, eos=False):
        return [1, 7, 9, 11, 13]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_compiled_cuda_graph_decode_equals_eager():
    from gentool.lm.sample import Generator, SamplingParams

    cfg = config_from_preset("mini", vocab_size=512)
    m = Transformer(cfg).cuda()
    m.init_weights(0)
    m = m.to(torch.bfloat16).eval()
    params = SamplingParams(max_new_tokens=40, temperature=0)
    eager = Generator(m, _Tok(), device="cuda", compile=False).generate("", params)[0].completion
    m.reset_cache()
    graphed = Generator(m, _Tok(), device="cuda", compile=True)
    graphed.generate("", params)
    assert graphed.generate("", params)[0].completion == eager
    sampled = [graphed.generate("", SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5))[0]
               .completion for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_cuda_training_bf16_and_perplexity(tmp_path):
    from gentool.evaluation.windows import perplexity

    cfg = config_from_preset("mini", vocab_size=256)
    m = Transformer(cfg).cuda()
    m.init_weights(0)
    ids = torch.randint(0, 256, (2000,))
    a = perplexity(m.eval(), ids, window=128, stride=64, device="cuda", dtype=torch.float32)
    b = perplexity(m.eval(), ids, window=128, stride=64, device="cuda", dtype=torch.bfloat16)
    assert abs(a.nll - b.nll) / a.nll < 2e-2
    from gentool.train.optim import build_optimizer

    opt = build_optimizer(m, lr=1e-3, weight_decay=0.1, device="cuda")
    x = torch.randint(0, 256, (4, 65), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
