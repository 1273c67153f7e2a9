import json
import shutil
import math

import pytest
import torch
import torch.nn.functional as F

from gentool.config import config_from_preset
from gentool.evaluation.windows import perplexity, plan_windows
from gentool.lm.sample import SamplingParams, process_logits
from gentool.models.checkpoint import save_lm
from gentool.models.transformer import Transformer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    """A tiny random model saved in the HF layout with a real SentencePiece tokenizer."""
    d = tmp_path_factory.mktemp("ck")
    shutil.copytree(tiny_tokenizer, d / "tok")
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


def test_protocols(ckpt, tmp_path, cli):
    from gentool.evaluation.windows import plan_hf_strided, plan_llamacpp

    assert [(w.start, w.end, w.score_from) for w in plan_llamacpp(1100, 512)] == [(0, 512, 257), (512, 1024, 769)]
    covered = [t for w in plan_hf_strided(100, 16, 6) for t in range(w.score_from, w.end)]
    assert covered == list(range(1, 100))
    text = tmp_path / "t.txt"
    text.write_text("Sir, I will be with you anon, and speak of it.\n" * 30)
    out = {}
    for proto in ("gentool", "hf-strided", "llama.cpp"):
        r = cli("perplexity", ckpt / "lm", text, "--protocol", proto, "--window", "32", "--stride", "8", "--json",
                "--device", "cpu")
        assert r.exit_code == 0, r.output
        out[proto] = json.loads(r.stdout)
        assert out[proto]["protocol"] == proto
    assert out["llama.cpp"]["tokens"] < out["gentool"]["tokens"] == out["hf-strided"]["tokens"]
    assert out["llama.cpp"]["bos"] is True and out["llama.cpp"]["bos_rule"].startswith("replaces")
    assert out["gentool"]["bos"] is True and "SentencePiece default" in out["gentool"]["bos_rule"]
    assert cli("perplexity", ckpt / "lm", text, "--protocol", "x").exit_code == 2


def test_window_stride_equivalences(ckpt):
    """A text that fits in the window scores the same whatever the stride, and equals one full-context forward;
    the chunked output head equals plain logits + cross-entropy; a longer text with stride < window equals the
    naive per-token reference only when stride is 1, and never re-scores a token."""
    from gentool.evaluation.windows import token_nlls, window_nll
    from gentool.models.checkpoint import load_lm

    model = load_lm(ckpt / "lm").model
    ids = torch.randint(0, 400, (40,))
    with torch.no_grad():
        full = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none").double()
        chunked = window_nll(model, ids[None], chunk_rows=7)[0]
    assert torch.allclose(chunked.double(), full, atol=1e-6)
    for window, stride in [(40, 40), (40, 1), (40, 13), (64, 64), (64, 5)]:
        nll = token_nlls(model, ids, window=window, stride=stride, batch_size=3)
        assert torch.allclose(nll, full, atol=1e-5), (window, stride)
    long = torch.randint(0, 400, (100,))
    for stride in (3, 16):
        nll = token_nlls(model, long, window=16, stride=stride, batch_size=4)
        assert len(nll) == 99
        # tokens of the first window see all their context in both: identical
        assert torch.allclose(nll[:15], token_nlls(model, long[:16], window=16, stride=16), atol=1e-5)


def test_shards_score_every_token_and_exact_bytes(ckpt, tmp_path, cli):
    from gentool.data.shards import open_shards
    from gentool.data.text import bundled_corpus
    from gentool.models.checkpoint import load_lm
    from gentool.tokenize import encode_corpus

    text = (bundled_corpus("shakespeare/comedies") / "twelfth_night.txt").read_text()[:20000]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    encode_corpus([str(tmp_path / "corpus")], ckpt / "tok", tmp_path / "tokens", workers=1, val_fraction=0.3)
    shards = open_shards(tmp_path / "tokens", "val")
    r = cli("perplexity", ckpt / "lm", tmp_path / "tokens", "--window", "64", "--json", "--device", "cpu",
            "--batch-size", "16")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["tokens"] == len(shards) and res["bytes"] == shards.bytes
    stream = torch.cat([torch.tensor([shards.eos_id]), torch.from_numpy(shards.tokens(0, len(shards)))])
    ref = perplexity(load_lm(ckpt / "lm").model, stream, window=64, stride=32)
    assert res["nll"] == pytest.approx(ref.nll, rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(ref.total_nll / math.log(2) / shards.bytes, rel=1e-6)


def test_perplexity_empty_and_bad_inputs(ckpt, tmp_path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = cli("perplexity", ckpt / "lm", empty, "--device", "cpu")
    assert r.exit_code == 2 and "fewer than two tokens" in r.output
    r = cli("perplexity", ckpt / "lm", "-", "--device", "cpu", input="")
    assert r.exit_code == 2
    r = cli("perplexity", ckpt / "lm", empty, "--window", "1000", "--device", "cpu")
    assert r.exit_code == 2 and "exceeds the model's context" in r.output
    r = cli("perplexity", ckpt / "lm", tmp_path / "nope.txt", "--device", "cpu")
    assert r.exit_code != 0 and "nope.txt" in r.output
    r = cli("perplexity", ckpt / "lm", "-", "--device", "cpu", "--json", input="To be, or not to be.\n")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bits_per_byte"] > 0


@pytest.mark.slow
def test_compiled_scorer_equals_eager(ckpt):
    """The `--compile` path (also the GPU benchmark's) gives the eager scorer's NLLs, padded last batch included."""
    from gentool.evaluation.windows import token_nlls
    from gentool.models.checkpoint import load_lm

    model = load_lm(ckpt / "lm").model
    ids = torch.randint(0, 400, (300,))
    eager = token_nlls(model, ids, window=32, stride=16, batch_size=4)
    compiled = token_nlls(model, ids, window=32, stride=16, batch_size=4, compile=True)
    assert torch.allclose(eager, compiled, atol=1e-4)
