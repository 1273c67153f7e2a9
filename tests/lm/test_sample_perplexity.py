import json
import math

import pytest
import torch
import torch.nn.functional as F

from gentool.config import config_from_preset
from gentool.lm.perplexity import perplexity, plan_windows
from gentool.lm.sample import SamplingParams, process_logits
from gentool.models.checkpoint import save_lm
from gentool.models.transformer import Transformer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random model saved in the HF layout with a real SentencePiece tokenizer."""
    from gentool.tokenize import train_tokenizer

    d = tmp_path_factory.mktemp("ck")
    train_tokenizer(["builtin:shakespeare/comedies"], d / "tok", vocab_size=400)
    cfg = config_from_preset("tiny", vocab_size=400, max_position_embeddings=64)
    m = Transformer(cfg)
    m.init_weights(0)
    (d / "lm").mkdir()
    save_lm(m, cfg, d / "lm")
    (d / "lm" / "tokenizer.model").write_bytes((d / "tok" / "tokenizer.model").read_bytes())
    return d


def naive_nll(model, ids, window):
    """Reference: score token i with the previous min(i, window-1) tokens, one forward per token."""
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(ids)):
            ctx = ids[max(0, i - window + 1):i + 1]
            logp = F.log_softmax(model(ctx[None])[0, -2], -1)
            total -= logp[ids[i]].item()
    return total / (len(ids) - 1)


def test_plan_scores_every_token_once():
    for n, w, s in [(100, 16, 16), (100, 16, 5), (17, 16, 8), (5, 16, 4), (64, 8, 1)]:
        covered = []
        for win in plan_windows(n, w, s):
            assert win.end - win.start <= w and win.start < win.score_from <= win.end
            covered.extend(range(win.score_from, win.end))
        assert covered == list(range(1, n))


def test_perplexity_equals_naive_reference(ckpt):
    from gentool.models.checkpoint import load_lm

    lm = load_lm(ckpt / "lm")
    ids = torch.randint(0, 400, (50,))
    res = perplexity(lm.model, ids, window=16, stride=1)  # stride 1: every token gets a full window
    assert res.tokens == 49
    assert res.nll == pytest.approx(naive_nll(lm.model, ids, 16), rel=1e-5)


@pytest.mark.oracle
def test_perplexity_equals_transformers_loss(ckpt):
    transformers = pytest.importorskip("transformers")
    from gentool.models.checkpoint import load_lm

    lm = load_lm(ckpt / "lm")
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt / "lm", dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (64,))
    with torch.no_grad():
        ref = hf(ids[None], labels=ids[None]).loss.item()
    res = perplexity(lm.model, ids, window=64, stride=64)
    assert abs(res.nll - ref) / ref < 1e-5


@pytest.mark.oracle
def test_greedy_equals_transformers_generate(ckpt, cli):
    transformers = pytest.importorskip("transformers")
    from gentool.data.tokenizer import load_tokenizer

    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt / "lm", dtype=torch.float32).eval()
    tok = load_tokenizer(ckpt / "lm")
    prompt = "Sir, I"
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=20)[0, ids.shape[1]:].tolist()
    r = cli("sample", ckpt / "lm", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20", "--json",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.splitlines()[0])
    expected = ref[: ref.index(2)] if 2 in ref else ref
    assert out["completion"] == tok.decode(expected)


def test_seeded_sampling_reproducible_and_streaming(ckpt, cli):
    args = ("sample", ckpt / "lm", "-p", "To be", "--max-new-tokens", "15", "--seed", "3", "--device", "cpu")
    a, b = cli(*args), cli(*args)
    assert a.exit_code == 0 and a.stdout == b.stdout and a.stdout.startswith("To be")
    j = cli(*args, "--json")
    assert json.loads(j.stdout)["completion"] == a.stdout[len("To be"):].rstrip("\n")
    c = cli(*args[:-4], "--seed", "4", "--device", "cpu")
    assert c.exit_code == 0


def test_logit_filters_match_naive():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    p = SamplingParams(temperature=1.0, top_k=2)
    assert torch.isinf(process_logits(logits, p)[0, 2:]).all()
    p = SamplingParams(temperature=1.0, top_p=0.7)
    kept = ~torch.isinf(process_logits(logits, p))
    assert kept.tolist() == [[True, True, False, False]]
    p = SamplingParams(temperature=1.0, min_p=0.4)  # keeps p >= 0.2
    assert (~torch.isinf(process_logits(logits, p))).tolist() == [[True, True, False, False]]
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    out = process_logits(torch.tensor([[1.0, -1.0, 3.0]]), p, seen=torch.tensor([[0, 1]]))
    assert out.tolist() == [[0.5, -2.0, 3.0]]


def test_perplexity_cli_and_bad_inputs(ckpt, tmp_path, cli):
    text = tmp_path / "t.txt"
    text.write_text("Sir, I will be with you anon.\n" * 5)
    r = cli("perplexity", ckpt / "lm", text, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["perplexity"] == pytest.approx(math.exp(res["nll"])) and res["bits_per_byte"] > 0
    from gentool.tokenize import encode_corpus, train_tokenizer

    train_tokenizer(["builtin:shakespeare/tragedies"], tmp_path / "tok2", vocab_size=400)
    encode_corpus(["builtin:shakespeare/tragedies"], tmp_path / "tok2", tmp_path / "tokens2", workers=1)
    r = cli("perplexity", ckpt / "lm", tmp_path / "tokens2", "--device", "cpu")
    assert r.exit_code == 2 and "different tokenizer" in r.output
    r = cli("perplexity", ckpt / "lm", tmp_path / "tokens2", "--allow-tokenizer-mismatch", "--max-tokens", "100",
            "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tokens"] == 100
    r = cli("perplexity", tmp_path, text)
    assert r.exit_code == 2 and "config.json" in r.output
    r = cli("sample", ckpt / "tok", "-p", "x")
    assert r.exit_code == 2
