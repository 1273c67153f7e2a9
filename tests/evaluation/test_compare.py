"""The damage report: its statistics against a naive computation and llama.cpp's formulas, streaming in slices,
per-token JSON lines, and — with the llama.cpp build — the same mean KL and ΔPPL as `llama-perplexity
--kl-divergence` on the same pair of GGUF files."""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _peers import llama_bin

from gentool.evaluation.compare import KLStats, compare_logits, llama_logits_tokens


def test_stats_match_a_naive_computation(tmp_path):
    torch.manual_seed(0)
    lb, lq = torch.randn(300, 50) * 2, torch.randn(300, 50) * 2
    lq = lb + 0.3 * lq
    t = torch.randint(0, 50, (300,))
    with open(tmp_path / "kl.jsonl", "w") as f:
        s = KLStats(f)
        for i in range(0, 300, 64):  # slices: the same figures as one pass
            s.add(lb[i:i + 64], lq[i:i + 64], t[i:i + 64], torch.arange(i, min(i + 64, 300)))
    r = s.report()
    pb, pq = lb.double().log_softmax(-1), lq.double().log_softmax(-1)
    kl = (pb.exp() * (pb - pq)).sum(-1)
    nb, nq = -pb.gather(-1, t[:, None])[:, 0], -pq.gather(-1, t[:, None])[:, 0]
    assert r["tokens"] == 300
    assert r["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert r["kl_mean_err"] == pytest.approx(float(kl.std() / math.sqrt(300)), rel=1e-3)
    assert r["kl_median"] == pytest.approx(float(np.median(kl.numpy())), rel=1e-5)
    assert r["kl_p99"] == pytest.approx(float(np.quantile(kl.numpy(), 0.99)), rel=1e-5)
    assert r["kl_max"] == pytest.approx(float(kl.max()), rel=1e-5)
    assert r["ppl_base"] == pytest.approx(math.exp(float(nb.mean())), rel=1e-6)
    assert r["ppl_quant"] == pytest.approx(math.exp(float(nq.mean())), rel=1e-6)
    d = (nq - nb).numpy()  # ln(PPL(Q)/PPL(base)) and its error from the paired differences
    assert r["ln_ppl_ratio"] == pytest.approx(d.mean(), rel=1e-6)
    assert r["ln_ppl_ratio_err"] == pytest.approx(d.std(ddof=0) / math.sqrt(299), rel=1e-3)
    assert r["top1_agreement"] == pytest.approx(float((lb.argmax(-1) == lq.argmax(-1)).double().mean()))
    lines = [json.loads(x) for x in (tmp_path / "kl.jsonl").read_text().splitlines()]
    assert len(lines) == 300 and lines[7]["index"] == 7 and lines[7]["token"] == int(t[7])
    assert lines[7]["kl"] == pytest.approx(float(kl[7]), rel=1e-5)


class _Toy(torch.nn.Module):
    """Logits of a fixed random bigram table; `hidden_states` + `lm_head` like the Transformer."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.lm_head = torch.nn.Identity()

    def hidden_states(self, x):
        return self.table[x]


def test_streaming_equals_whole_window(tmp_path):
    torch.manual_seed(1)
    table = torch.randn(30, 30)
    a, b = _Toy(table), _Toy(table + 0.2 * torch.randn(30, 30))
    ids = torch.randint(0, 30, (500,))
    small = compare_logits(a, b, ids, window=64, chunk_rows=7, kl_tokens=tmp_path / "t.jsonl")
    big = compare_logits(a, b, ids, window=64, chunk_rows=4096)
    assert small["tokens"] == big["tokens"] == 499  # every token but the first, once
    for k in ("kl_mean", "kl_p99", "ppl_quant", "delta_ppl", "top1_agreement"):
        assert small[k] == pytest.approx(big[k], rel=1e-9)
    idx = [json.loads(x)["index"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert sorted(idx) == list(range(1, 500))


# --- the same figures as llama-perplexity -----------------------------------------------------------------------------

def _bigram_lm(directory: Path, tokenizer: Path, text: str):
    """A Llama checkpoint whose embeddings and head hold the text's bigram log-probabilities (a least-squares fit
    through random unit-RMS embeddings), so it predicts well and quantization hurts it systematically."""
    import sentencepiece as spm

    from gentool.artifacts import create_artifact
    from gentool.config import config_from_preset
    from gentool.models.checkpoint import save_lm
    from gentool.models.transformer import Transformer

    ids = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model")).encode(text)
    v, d = 400, 256
    counts = np.ones((v, v))
    np.add.at(counts, (ids[1:], ids[:-1]), 1)
    logp = np.log(counts / counts.sum(0, keepdims=True))             # [next, current]
    cfg = config_from_preset("tiny", vocab_size=v, hidden_size=d, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=256)
    m = Transformer(cfg)
    m.init_weights(0)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((v, d))
    head = logp @ emb @ np.linalg.inv(emb.T @ emb)
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.from_numpy(emb))
        m.lm_head.weight.copy_(torch.from_numpy(head))
    with create_artifact(directory, "lm-checkpoint", config={"test": True}) as art:
        save_lm(m, cfg, art.dir)
        shutil.copy(tokenizer / "tokenizer.model", art.dir / "tokenizer.model")


def _llama_stats(out: str) -> dict[str, float]:
    def grab(label):
        m = re.search(re.escape(label) + r"\s*:\s*([-\d.e+]+)", out)
        assert m, f"llama-perplexity printed no {label!r}:\n{out[-2000:]}"
        return float(m.group(1))
    return {"kl_mean": grab("Mean    KLD"), "delta_ppl": grab("Mean PPL(Q)-PPL(base)"),
            "ln_ppl_ratio": grab("Mean ln(PPL(Q)/PPL(base))"), "ppl_base": grab("Mean PPL(base)")}


@pytest.mark.skipif(llama_bin() is None, reason="llama.cpp tools not built ($GENTOOL_LLAMA_CPP_BIN)")
def test_same_figures_as_llama_perplexity(tmp_path, tiny_tokenizer):
    import gentool
    from gentool.gguf import export_gguf, import_gguf
    from gentool.models.checkpoint import load_lm

    text = (Path(gentool.__file__).parent / "data" / "bundled" / "shakespeare" / "comedies" /
            "twelfth_night.txt").read_text()
    _bigram_lm(tmp_path / "lm", tiny_tokenizer, text)
    (tmp_path / "eval.txt").write_text(text[:200_000])
    export_gguf(tmp_path / "lm", tmp_path / "base.gguf", qtype="f32")
    export_gguf(tmp_path / "lm", tmp_path / "q.gguf", qtype="q4_0", tensor_types=["output=q4_0"])
    import_gguf(tmp_path / "q.gguf", tmp_path / "q", keep_quantized=True)
    import_gguf(tmp_path / "base.gguf", tmp_path / "base")
    run = [str(llama_bin() / "llama-perplexity"), "-c", "128", "-t", "2", "--kl-divergence-base",
           str(tmp_path / "b.kld")]
    subprocess.run(run + ["-m", str(tmp_path / "base.gguf"), "-f", str(tmp_path / "eval.txt"), "--chunks", "60"],
                   check=True, capture_output=True)
    res = subprocess.run(run + ["-m", str(tmp_path / "q.gguf"), "--kl-divergence"], check=True, capture_output=True,
                         text=True)
    ref = _llama_stats(res.stdout + res.stderr)
    n_ctx, _, ids = llama_logits_tokens(tmp_path / "b.kld")
    base, q = load_lm(tmp_path / "base"), load_lm(tmp_path / "q")
    ours = compare_logits(base.model, q.model, ids, window=n_ctx, protocol="llama.cpp", bos_id=1)
    assert ours["ppl_base"] == pytest.approx(ref["ppl_base"], rel=2e-3)
    assert ours["kl_mean"] == pytest.approx(ref["kl_mean"], rel=0.02)
    assert ours["delta_ppl"] == pytest.approx(ref["delta_ppl"], rel=0.02)
