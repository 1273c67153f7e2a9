"""gentool sample: exactness against transformers and against no-cache recomputation, the logits processors
against naive implementations, seeded sampling, padding, streaming, stop strings and bad input."""

import json
import math
import shutil

import pytest
import torch

from gentool.config import config_from_preset
from gentool.lm.sample import (Generator, SamplingParams, TextStream, process_logits, row_keys, sample_tokens)
from gentool.models.checkpoint import load_lm, save_lm
from gentool.models.transformer import Transformer

SHAKESPEARE = "/work/shared/data/shakespeare/hamlet.txt"


def _spm(path, vocab):
    """A Llama-like SentencePiece model (dummy prefix, byte fallback) trained on a little Shakespeare."""
    import io

    import sentencepiece as spm

    try:
        text = open(SHAKESPEARE, encoding="utf-8").read()[:120_000]
    except OSError:
        text = "To be, or not to be, that is the question.\n" * 400
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model,
                                   vocab_size=vocab, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2, num_threads=1)
    path.write_bytes(model.getvalue())


def _randomize(model, seed, std=0.25):
    """Larger-than-usual weights: peaked next-token distributions, so greedy choices are far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    _spm(d / "tokenizer.model", 400)
    cfg = config_from_preset("tiny", vocab_size=400, max_position_embeddings=96)
    m = Transformer(cfg)
    _randomize(m, 0)
    (d / "lm").mkdir()
    save_lm(m, cfg, d / "lm")
    shutil.copy(d / "tokenizer.model", d / "lm" / "tokenizer.model")
    return d


def _gen(path, **kw):
    from gentool.data.tokenizer import load_tokenizer

    lm = load_lm(path)
    return Generator(lm.model, load_tokenizer(lm.tokenizer_path), device="cpu", **kw)


PROMPTS = ["To be, or not", "Hamlet", "O, what a rogue and peasant slave am I!"]


def _completion_text(tok, ctx, ids):
    return tok.decode(ctx + ids)[len(tok.decode(ctx)):]


@pytest.mark.oracle
def test_greedy_equals_transformers_generate_both_ways(ck, tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    # a transformers model, saved with save_pretrained, decoded by gentool (batched: left padding)
    hcfg = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    _randomize(hf, 1)
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(ck / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    for src, model in [(tmp_path / "hf", hf),  # ... and gentool's checkpoint in transformers
                       (ck / "lm", transformers.LlamaForCausalLM.from_pretrained(ck / "lm", dtype=torch.float32))]:
        gen = _gen(src)
        rows = [(p, gen.encode(p, 24)) for p in PROMPTS]
        ours = gen.generate_ids(rows, SamplingParams(max_new_tokens=24, temperature=0))
        for (_, ids), got in zip(rows, ours):
            out = model.eval().generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                                        pad_token_id=3, output_logits=True, return_dict_in_generate=True)
            ref = out.sequences[0, len(ids):].tolist()
            ref_lp = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, ref)]
            if 2 in ref:
                ref, ref_lp = ref[:ref.index(2)], ref_lp[:ref.index(2)]
            assert got.token_ids == ref
            assert got.sum_logprob == pytest.approx(sum(ref_lp), abs=1e-4)
    r = cli("sample", ck / "lm", "-p", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "24", "--json",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    line = json.loads(r.stdout)
    assert line["completion"] == _completion_text(gen.tok, rows[0][1], ours[0].token_ids)
    assert line["tokens"] == len(ours[0].token_ids) and line["prompt"] == PROMPTS[0]


def _naive(model, ids, params, n, key):
    """Reference decoding: a full forward over the whole sequence for every token (no cache)."""
    ids, out, lps = list(ids), [], []
    with torch.no_grad():
        for i in range(n):
            logits = model(torch.tensor([ids]))[:, -1].float()
            seen = torch.tensor([ids])
            tok = sample_tokens(process_logits(logits, params, seen), params, key, torch.tensor([i])).item()
            lps.append(torch.log_softmax(logits, -1)[0, tok].item())
            ids.append(tok)
            out.append(tok)
    return out, lps


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
                                    SamplingParams(max_new_tokens=30, temperature=1.3, top_k=40, top_p=0.95,
                                                   min_p=0.02, repetition_penalty=1.3, seed=7, ignore_eos=True)])
@pytest.mark.parametrize("fuse", [True, False])
def test_kv_cache_decode_equals_recompute(ck, params, fuse):
    gen = _gen(ck / "lm", fuse=fuse)
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    ids = gen.encode(PROMPTS[2], 30)
    got = gen.generate_ids([("", ids)], params, samples=[0])[0]
    after = gen.model.state_dict()  # fusing q/k/v and gate/up keeps the HF layout and the values
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    gen.model.reset_cache()
    ref, ref_lp = _naive(gen.model, ids, params, 30, row_keys(params.seed, [0]))
    assert got.token_ids == ref and got.stopped == "length"
    assert got.logprobs == pytest.approx(ref_lp, abs=1e-5)


def test_left_padded_batch_equals_one_by_one(ck):
    gen, general = _gen(ck / "lm"), _gen(ck / "lm", fuse=False)
    for params in [SamplingParams(max_new_tokens=20, temperature=0), SamplingParams(max_new_tokens=20, seed=3)]:
        rows = [(p, gen.encode(p, 20)) for p in PROMPTS]
        batch = gen.generate_ids(rows, params, samples=[0, 0, 1])
        for row, j, got in zip(rows, [0, 0, 1], batch):
            alone = gen.generate_ids([row], params, samples=[j])[0]
            assert general.generate_ids([row], params, samples=[j])[0].token_ids == got.token_ids
            assert got.token_ids == alone.token_ids and got.completion == alone.completion
            assert got.sum_logprob == pytest.approx(alone.sum_logprob, abs=1e-4)


def _naive_filter(row, params):
    """Per-row reference for the logits processors, written with sorted Python lists."""
    x = [v / params.temperature for v in row]
    keep = set(range(len(x)))
    if params.top_k:
        keep = set(sorted(keep, key=lambda i: -x[i])[:params.top_k])
    z = max(x[i] for i in keep)
    p = {i: math.exp(x[i] - z) for i in keep}
    s = sum(p.values())
    p = {i: v / s for i, v in p.items()}
    if params.top_p is not None:
        mass, chosen = 0.0, set()
        for i in sorted(keep, key=lambda i: -p[i]):
            if mass >= params.top_p:
                break
            chosen.add(i)
            mass += p[i]
        keep = chosen
        s = sum(p[i] for i in keep)
        p = {i: p[i] / s for i in keep}
    if params.min_p is not None:
        top = max(p.values())
        keep = {i for i in keep if p[i] >= params.min_p * top}
    return keep


def test_logits_processors_match_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 2
    for params in [SamplingParams(top_k=5), SamplingParams(top_p=0.6), SamplingParams(min_p=0.1),
                   SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05), SamplingParams(top_k=1),
                   SamplingParams(temperature=2.0, top_p=0.999)]:
        out = process_logits(logits, params)
        for r in range(len(logits)):
            kept = {i for i in range(50) if out[r, i] > float("-inf")}
            assert kept == _naive_filter(logits[r].tolist(), params), params
            assert torch.allclose(out[r, sorted(kept)], logits[r, sorted(kept)] / params.temperature)
    seen = torch.tensor([[0, 1, 1], [2, 2, 2]])
    pen = process_logits(torch.tensor([[1.0, -1.0, 3.0], [2.0, 0.5, -4.0]]),
                         SamplingParams(temperature=0, repetition_penalty=2.0), seen)
    assert pen.tolist() == [[0.5, -2.0, 3.0], [2.0, 0.5, -8.0]]  # CTRL: divide positive, multiply negative


def test_gumbel_max_draws_follow_the_filtered_distribution():
    n = 40_000
    keys = row_keys(11, list(range(n)))
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])).expand(n, 5)
    for params, probs in [(SamplingParams(), [0.4, 0.3, 0.15, 0.1, 0.05]),
                          (SamplingParams(top_k=2), [4 / 7, 3 / 7, 0, 0, 0]),
                          (SamplingParams(temperature=0.5), [x * x / 0.2850 for x in [0.4, 0.3, 0.15, 0.1, 0.05]])]:
        draws = sample_tokens(process_logits(logits, params), params, keys, torch.tensor([5]))
        freq = torch.bincount(draws, minlength=5).double() / n
        assert torch.allclose(freq, torch.tensor(probs, dtype=torch.double), atol=0.012), (params, freq)
    a = sample_tokens(logits[:50], SamplingParams(), keys[:50], torch.tensor([0]))
    assert torch.equal(a, sample_tokens(logits[:50], SamplingParams(), row_keys(11, list(range(50))),
                                        torch.tensor([0])))
    assert not torch.equal(a, sample_tokens(logits[:50], SamplingParams(), keys[:50], torch.tensor([1])))


def test_seeded_sampling_reproducible_and_stream_equals_json(ck, cli):
    args = ("sample", ck / "lm", "-p", "To be", "--max-new-tokens", "25", "--temperature", "1", "--device", "cpu")
    a, b = cli(*args, "--seed", "3"), cli(*args, "--seed", "3")
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout and a.stdout.startswith("To be")
    assert cli(*args, "--seed", "4").stdout != a.stdout
    j = json.loads(cli(*args, "--seed", "3", "--json").stdout)
    assert a.stdout == "To be" + j["completion"] + "\n"
    assert j["tokens"] > 0 and j["sum_logprob"] < 0 and j["tokens_per_s"] > 0


def test_chat_on_sentencepiece_uses_the_default_template(ck, cli):
    """A SentencePiece checkpoint has no template of its own: --chat renders gentool's default one (what tokenize
    encode trains chats on), BOS and EOS as their special ids, not the characters '<s>' and '</s>'."""
    from gentool.lm.generate import encode_prompts

    gen = _gen(ck / "lm")
    rows, samples = encode_prompts(gen, ["To be"], max_new_tokens=4, num_samples=2, chat=True)
    tok = gen.tok
    want = [tok.bos_id, *tok.encode("<|user|>\nTo be"), tok.eos_id, *tok.encode("\n<|assistant|>\n")]
    assert rows == [("To be", want)] * 2 and samples == [0, 1]
    r = cli("sample", ck / "lm", "-p", "To be", "--chat", "--max-new-tokens", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output


class _CharTok:
    """One token per character; id 0 decodes to nothing (BOS)."""
    bos_id, eos_id, pad_id, eos_ids, add_bos = 0, None, None, set(), True

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


def test_text_stream_stop_strings_hold_back_and_cut():
    text = "ab\ncd\n\nef"
    s = TextStream(_CharTok(), [0], ["\n\n", "zz"])
    pieces = [s.push(ord(c)) for c in text]
    assert "".join(pieces) + s.finish() == s.text == "ab\ncd"
    assert s.stopped == "\n\n" and pieces[2] == ""  # the first "\n" waited: it could begin "\n\n"
    s = TextStream(_CharTok(), [0], ["\n\n"])
    pieces = [s.push(ord(c)) for c in "ab\nc"]
    assert pieces == ["a", "b", "", "\nc"] and s.finish() == "" and s.stopped is None


def test_text_stream_utf8_and_sentencepiece_spaces(ck):
    from gentool.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ck / "tokenizer.model")
    ctx = tok.encode("To be", bos=True)
    ids = tok.encode(" or not — naïve 日本語 🙂, to be!")
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback in play
    s = TextStream(tok, ctx)
    pieces = [s.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + s.finish() == s.text == _completion_text(tok, ctx, ids)
    assert s.text.startswith(" or not") and "日本語 🙂" in s.text


def test_stop_string_cli_and_streaming(ck, cli):
    base = ("sample", ck / "lm", "-p", "To be", "--temperature", "0", "--max-new-tokens", "40", "--device", "cpu")
    full = json.loads(cli(*base, "--json").stdout)["completion"]
    assert len(full) > 12
    stop = full[6:9]
    cut = full[:full.index(stop)]
    r = json.loads(cli(*base, "--json", "--stop", stop, "--stop", "\x00never").stdout)
    assert r["completion"] == cut and r["stopped"] == "stop" and r["tokens"] < 40
    streamed = cli(*base, "--stop", stop)
    assert streamed.exit_code == 0 and streamed.stdout == "To be" + cut + "\n"


def test_prompt_file_batches_json_lines_in_order(ck, tmp_path, cli):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n\n")
    r = cli("sample", ck / "lm", "--prompt-file", f, "--num-samples", "2", "--max-new-tokens", "8", "--json",
            "--batch-size", "4", "--device", "cpu")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == [p for p in PROMPTS for _ in range(2)]
    alone = json.loads(cli("sample", ck / "lm", "-p", PROMPTS[2], "--num-samples", "2", "--max-new-tokens", "8",
                           "--json", "--device", "cpu").stdout.splitlines()[1])
    assert alone["completion"] == lines[5]["completion"]
    piped = cli("sample", ck / "lm", "--max-new-tokens", "8", "--json", "--device", "cpu", input="Hamlet\n")
    assert json.loads(piped.stdout)["prompt"] == "Hamlet"


def test_bad_inputs(ck, tmp_path, cli):
    lm2 = tmp_path / "notok"
    shutil.copytree(ck / "lm", lm2)
    (lm2 / "tokenizer.model").unlink()
    r = cli("sample", lm2, "-p", "x", "--device", "cpu")
    assert r.exit_code == 2 and "no tokenizer" in r.output and "--tokenizer" in r.output
    assert cli("sample", lm2, "-p", "x", "--tokenizer", ck / "tokenizer.model", "--max-new-tokens", "3",
               "--device", "cpu").exit_code == 0
    _spm(tmp_path / "big.model", 600)  # more ids than the model's 400 embeddings
    r = cli("sample", lm2, "-p", "x", "--tokenizer", tmp_path / "big.model", "--device", "cpu")
    assert r.exit_code == 2 and "does not fit the model" in r.output
    (tmp_path / "empty.txt").write_text("\n  \n")
    r = cli("sample", ck / "lm", "--prompt-file", tmp_path / "empty.txt", "--device", "cpu")
    assert r.exit_code == 2 and "empty input" in r.output
    r = cli("sample", ck / "lm", "--device", "cpu", input="")
    assert r.exit_code == 2 and "empty input" in r.output
    r = cli("sample", ck / "lm", "--prompt-file", tmp_path / "missing.txt", "--device", "cpu")
    assert r.exit_code == 2 and "missing.txt" in r.output
    mistral = tmp_path / "mistral"
    shutil.copytree(ck / "lm", mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(cfg))
    r = cli("sample", mistral, "-p", "x", "--device", "cpu")
    assert r.exit_code == 2 and "MistralForCausalLM is not supported" in r.output
    r = cli("sample", ck / "lm", "-p", "x", "--max-new-tokens", "96", "--device", "cpu")
    assert r.exit_code == 2 and "context window" in r.output
    r = cli("sample", ck / "lm", "-p", "x", "--top-p", "1.5", "--device", "cpu")
    assert r.exit_code == 2
    long = "To be, or not to be, that is the question. " * 20
    r = cli("sample", ck / "lm", "-p", long, "--max-new-tokens", "30", "--json", "--device", "cpu")
    assert r.exit_code == 0 and "truncated from the left" in r.stderr
    assert json.loads(r.stdout)["tokens"] > 0


@pytest.mark.parametrize("fuse", [True, False])
def test_decode_step_is_one_graph(ck, fuse):
    """fullgraph=True fails on any graph break: the whole step (forward, filters, draw, bookkeeping) is capturable;
    CUDA runs this same step under inductor and CUDA graphs."""
    eager, traced = _gen(ck / "lm", fuse=fuse), _gen(ck / "lm", fuse=fuse, compile="eager")
    params = SamplingParams(max_new_tokens=8, temperature=1.1, top_k=30, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.2, seed=2)
    rows = [(p, eager.encode(p, 8)) for p in PROMPTS[:2]]
    for batch in (rows, rows[:1]):
        assert [r.token_ids for r in traced.generate_ids(batch, params)] == \
            [r.token_ids for r in eager.generate_ids(batch, params)]
