"""`gentool evaluate` end to end: an AR and a masked-diffusion checkpoint on the example tasks, the evaluation
artifact (results, per-example log, manifest) and scale-fit reading it as a run."""

import json
from pathlib import Path

import pytest

TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokens):
    from typer.testing import CliRunner

    from gentool.cli import app

    d = tmp_path_factory.mktemp("evalcli")
    for args in (["train-lm", tiny_tokens, "-o", d / "lm", "--preset", "tiny", "--steps", "2", "--seq-len", "32",
                  "--micro-batch", "2", "--device", "cpu"],
                 ["train-diffusion", tiny_tokens, "-o", d / "mdlm", "--preset", "tiny", "--seq-len", "64",
                  "--steps", "1", "--batch-size", "2", "--device", "cpu"]):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    return d


def test_ar_artifact_and_scale_fit_reader(cli, runs, tmp_path):
    out = tmp_path / "ev"
    r = cli("evaluate", runs / "lm", TASKS / "shakespeare_next_line.yaml", TASKS / "shakespeare_cloze.yaml",
            "--limit", "6", "--num-fewshot", "1", "-o", out, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    mc = res["results"]["shakespeare_next_line"]
    assert mc["samples"] == 6 and 0 <= mc["acc"] <= 1 and mc["acc_stderr"] is not None
    assert res["fewshot_seed"] == 1234 and res["tasks"]["shakespeare_cloze"]["sha256"].startswith("sha256:")
    log = [json.loads(x) for x in (out / "examples-shakespeare_next_line.jsonl").read_text().splitlines()]
    assert len(log) == 6 and {"prompt", "choices", "loglikelihoods", "prediction", "correct"} <= log[0].keys()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["acc"] == mc["acc"] and manifest["contents"]["train_flops"] > 0
    from gentool.scaling.io import read_table

    table = read_table([str(out)], {"x": "C", "v": "loss", "y": "acc"})
    assert [p.values["y"] for p in table.points] == [mc["acc"]]


def test_masked_diffusion_lm_scores_with_monte_carlo_stderr(cli, runs):
    r = cli("evaluate", runs / "mdlm", TASKS / "shakespeare_next_line.yaml", "--limit", "3", "--mc-samples", "4",
            "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["family"] == "masked-lm" and res["results"]["shakespeare_next_line"]["samples"] == 3


def test_diffusion_bound_of_a_block_size_one_model_is_the_exact_ar_loglikelihood():
    """With block size 1 the block NELBO is the exact AR NLL: every draw equals log p(cont | ctx)."""
    import torch

    from gentool.config import config_from_preset
    from gentool.lm.diffusion.likelihood import continuation_bound
    from gentool.models.transformer import Transformer

    m = Transformer(config_from_preset("tiny", vocab_size=21), causal=False).eval()
    m.init_weights(0)
    ctx, cont = [1, 5, 7, 3], [4, 9, 2]
    ll, se = continuation_bound(m, ctx, cont, 20, samples=3, block_size=1)
    x0 = torch.tensor([ctx + cont])
    want = 0.0
    with torch.no_grad():  # block size 1: position l sees clean x_<l and its own mask token
        for i in range(len(ctx), len(ctx) + len(cont)):
            xt = x0.clone()
            xt[0, i] = 20
            logits = m(xt, block_size=1, clean_ids=x0)[0, i].float()
            logits[20] = -float("inf")
            want += torch.log_softmax(logits, -1)[x0[0, i]].item()
    assert ll == pytest.approx(want, abs=1e-4) and se == pytest.approx(0, abs=1e-5)


def test_masked_diffusion_lm_generates_until(cli, runs):
    r = cli("evaluate", runs / "mdlm", TASKS / "arithmetic.yaml", "--limit", "2", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]["arithmetic"]
    assert res["samples"] == 2 and res["exact_match"] in (0.0, 0.5, 1.0)


def _greedy_reference(model, ids, n_new, mask_id, block_size=None):
    """Low-confidence greedy decoding written out: one token per network call, the masked position whose most
    probable token is most probable, set to that token; a block model fills one block at a time."""
    import torch

    def fill(prefix, canvas):
        while mask_id in canvas:
            with torch.no_grad():
                x = torch.tensor([prefix + canvas])
                logits = (model(x, block_size=block_size) if block_size else model(x))[0, len(prefix):].double()
            logits[:, mask_id] = -float("inf")
            p = torch.softmax(logits, -1)
            conf, arg = p.max(-1)
            conf[[i for i, t in enumerate(canvas) if t != mask_id]] = -1
            i = int(conf.argmax())
            canvas[i] = int(arg[i])
        return canvas

    if not block_size:
        return fill(list(ids), [mask_id] * n_new)
    seq = list(ids)
    while len(seq) < len(ids) + n_new:
        b0 = len(seq) // block_size * block_size
        seq = seq[:b0] + fill(seq[:b0], seq[b0:] + [mask_id] * (b0 + block_size - len(seq)))
    return seq[len(ids):len(ids) + n_new]


@pytest.mark.parametrize("block_size", [None, 4])
def test_diffusion_generate_until_is_greedy_low_confidence_decoding(tiny_tokenizer, tmp_path, block_size):
    import torch

    from gentool.config import config_from_preset
    from gentool.data.tokenizer import load_tokenizer
    from gentool.evaluation.continuation import encode_default
    from gentool.evaluation.tasks import load_task
    from gentool.lm.diffusion.masked import MaskSchedule
    from gentool.lm.evaluate import Scorer, run_task
    from gentool.models.transformer import Transformer

    tok = load_tokenizer(tiny_tokenizer)
    mask = tok.vocab_size
    m = Transformer(config_from_preset("tiny", vocab_size=mask + 1, max_position_embeddings=64), causal=False).eval()
    m.init_weights(1)
    y = (TASKS / "arithmetic.yaml").read_text().replace("max_gen_toks: 8", "max_gen_toks: 6")
    for split in ("test", "train"):
        y = y.replace(f"arithmetic.{split}.jsonl", str(TASKS / f"arithmetic.{split}.jsonl"))
    (tmp_path / "a.yaml").write_text(y.replace('until: ["\\n"]', 'until: ["9"]'))
    kind = "block-lm" if block_size else "masked-lm"
    scorer = Scorer(kind, m, tok, 64, "cpu", torch.float32, 4, mask, block_size, schedule=MaskSchedule())
    _, log = run_task(scorer, load_task(tmp_path / "a.yaml"), num_fewshot=1, limit=3, seed=1234)
    for rec in log:
        row = _greedy_reference(m, encode_default(tok, rec["prompt"]), 6, mask, block_size)
        row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
        assert rec["generation"] == tok.decode(row).split("9")[0]
