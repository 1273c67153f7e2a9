"""gentool compare on synthetic run directories with known curves: grouping by recipe over seeds, the statistics,
steps/tokens/seconds to a target, the Welch test against its closed form, exit status and refusals."""

import json
import math

import pytest
from scipy import stats

from gentool.compare import compare, welch
from gentool.errors import UsageProblem


def _run(path, *, optimizer, seed, finals, data="sha256:d", tokenizer="sha256:t", partial=False, metric="val_loss",
         steps=100, sec_per_step=0.5, family=None):
    """A run whose metric falls linearly from 6 to `finals` over `steps`, evaluated every 10 steps (family: a
    diffusion recipe's)."""
    d = path.with_name(path.name + ".partial") if partial else path
    d.mkdir(parents=True)
    recipe = {"data": data, "train": {"optimizer": optimizer, "seed": seed, "steps": steps}, "seq_len": 32,
              **({"family": family} if family else {})}
    if partial:
        (d / "run.json").write_text(json.dumps(recipe))
    else:
        (d / "manifest.json").write_text(json.dumps({"config": recipe, "contents": {"tokenizer_id": tokenizer}}))
    lines = []
    for s in range(10, steps + 1, 10):
        m = {"step": s, "tokens": 64 * s, "loss": 6 - (6 - finals) * s / steps, "seconds": s * sec_per_step + 3,
             "train_seconds": s * sec_per_step}
        m[metric] = m["loss"]
        lines.append(m)
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return str(path)


def _groups(tmp_path):
    fast = [_run(tmp_path / f"muon-{i}", optimizer="muon", seed=i, finals=f, steps=70, sec_per_step=0.6)
            for i, f in enumerate([4.00, 4.02, 3.98, 4.01, 3.99])]
    slow = [_run(tmp_path / f"adamw-{i}", optimizer="adamw", seed=i, finals=f)
            for i, f in enumerate([4.10, 4.12, 4.08, 4.11, 4.09])]
    return fast, slow


def test_groups_statistics_target_and_welch(tmp_path):
    fast, slow = _groups(tmp_path)
    r = compare(slow[:2] + fast + slow[2:], target=4.2, alpha=0.01)
    a, b = r["groups"]                                  # in order of first appearance: adamw first
    assert a["group"] == "optimizer=adamw, steps=100" and b["group"] == "optimizer=muon, steps=70"
    assert a["runs"] == b["runs"] == 5 and a["seeds"] == [0, 1, 2, 3, 4]
    assert a["final_val_loss"]["mean"] == pytest.approx(4.10)
    assert a["final_val_loss"]["std"] == pytest.approx(stats.tstd([4.10, 4.12, 4.08, 4.11, 4.09]))
    assert a["steps"]["mean"] == 100 and b["steps"]["mean"] == 70 and b["seconds"]["mean"] == pytest.approx(42)
    # the first evaluation at or below 4.2: adamw (6 -> 4.10 over 100) at step 100 except the 4.08 run (step 90...)
    expected = [next(s for s in range(10, 101, 10) if 6 - (6 - f) * s / 100 <= 4.2)
                for f in (4.10, 4.12, 4.08, 4.11, 4.09)]
    assert a["reached"] == 5 and a["to_target"]["steps"]["mean"] == pytest.approx(sum(expected) / 5)
    assert a["to_target"]["tokens"]["mean"] == pytest.approx(64 * sum(expected) / 5)
    assert a["to_target"]["seconds"]["mean"] == pytest.approx(0.5 * sum(expected) / 5)
    (t,) = r["tests"]
    assert t["p"] > 0.99 and not r["better"]             # adamw is worse: one-sided p near 1
    r = compare(fast + slow, alpha=0.01)
    x, y = [4.00, 4.02, 3.98, 4.01, 3.99], [4.10, 4.12, 4.08, 4.11, 4.09]
    v1, v2 = stats.tvar(x) / 5, stats.tvar(y) / 5       # Welch by hand: t and Satterthwaite's df
    t_ref = (sum(x) / 5 - sum(y) / 5) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / 4 + v2 ** 2 / 4)
    assert r["tests"][0]["t"] == pytest.approx(t_ref) and r["tests"][0]["p"] == pytest.approx(stats.t.cdf(t_ref, df))
    assert r["better"] and r["tests"][0]["ratio_first_to_other"]["steps"] == pytest.approx(0.7)
    assert r["tests"][0]["ratio_first_to_other"]["seconds"] == pytest.approx(42 / 50)
    r = compare(fast + slow, target=4.2)                  # muon: 6 -> ~4.0 over 70 steps is below 4.2 at step 70
    reach = r["tests"][0]["first_to_target_vs_other_final"]
    assert reach["steps"] == pytest.approx(70 / 100) and reach["seconds"] == pytest.approx(0.6 * 70 / 50)


def test_welch_is_undefined_without_spread_or_seeds():
    assert welch([1.0], [2.0, 3.0]) == (None, None)
    assert welch([1.0, 1.0], [1.0, 1.0]) == (None, None)


def test_cli_exit_status_json_plot_partial_and_globs(tmp_path, cli):
    fast, slow = _groups(tmp_path)
    _run(tmp_path / "muon-9", optimizer="muon", seed=9, finals=4.0, steps=70, sec_per_step=0.6, partial=True)
    r = cli("compare", str(tmp_path / "muon-*"), *slow, "--target", "4.2", "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert "[1] optimizer=muon" in r.stdout and "first group better" in r.stdout and "p = " in r.stdout
    assert "[1] reaches 4.2 in steps ×0.700, seconds ×0.840 of [2]'s whole run" in r.stdout
    assert "6 (seeds 0, 1, 2, 3, 4, 9)" in r.stdout          # the partial run (still running) is read too
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    r = cli("compare", *slow, *fast, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["better"] is False
    r = cli("compare", *fast[:1], *slow[:1])              # one seed each: no test, not shown better
    assert r.exit_code == 1 and "undefined" in r.stdout


def test_refusals(tmp_path, cli):
    a = _run(tmp_path / "a", optimizer="muon", seed=0, finals=4.0)
    b = _run(tmp_path / "b", optimizer="adamw", seed=0, finals=4.1, data="sha256:other")
    c = _run(tmp_path / "c", optimizer="adamw", seed=0, finals=4.1, tokenizer="sha256:other")
    d = _run(tmp_path / "d", optimizer="adamw", seed=0, finals=4.1, metric="val_bpb")
    for runs, msg in (([a, b], f"runs {a} and {b} were trained on different data"),
                      ([a, c], f"runs {a} and {c} were trained on different tokenizer"),
                      ([a, d], f"run {d} has no 'val_loss'"), ([str(tmp_path / "nope")], "no metrics.jsonl")):
        with pytest.raises(UsageProblem, match=msg):
            compare(runs)
        r = cli("compare", *runs)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    assert cli("compare", a, d, "--metric", "loss").exit_code == 1   # every run logs the training loss


def test_target_reached_by_some_runs_is_k_of_n(tmp_path, cli):
    # group [1]: one of three runs reaches 4.2 (at step 90), the other two end above it; [1] is worse on average
    first = [_run(tmp_path / f"a-{i}", optimizer="muon", seed=i, finals=f) for i, f in enumerate([4.18, 4.5, 4.6])]
    other = [_run(tmp_path / f"b-{i}", optimizer="adamw", seed=i, finals=f) for i, f in enumerate([4.1, 4.12, 4.11])]
    r = compare(first + other, target=4.2)
    g = r["groups"][0]
    assert g["reached"] == 1 and g["runs"] == 3
    assert g["to_target"]["steps"]["mean"] is None                 # undefined: two runs never reached it
    step = next(s for s in range(10, 101, 10) if 6 - (6 - 4.18) * s / 100 <= 4.2)
    assert g["to_target_reached"]["steps"]["mean"] == pytest.approx(step)
    assert r["tests"][0]["first_to_target_vs_other_final"] == {"steps": None, "seconds": None}
    out = cli("compare", *first, *other, "--target", "4.2")
    assert out.exit_code == 1 and "1/3 (the others never did)" in out.stdout
    assert "[1] reached 4.2 in 1 of 3 runs: no ratio" in out.stdout and "reaches 4.2 in" not in out.stdout


def test_non_finite_metric_is_undefined_not_inf(tmp_path, cli):
    a = [_run(tmp_path / f"a-{i}", optimizer="muon", seed=i, finals=f) for i, f in enumerate([4.0, 4.01])]
    b = [_run(tmp_path / f"b-{i}", optimizer="adamw", seed=i, finals=f) for i, f in enumerate([4.1, 4.12])]
    with open(tmp_path / "a-1" / "metrics.jsonl", "a") as f:   # the run diverged at its last evaluation
        f.write(json.dumps({"step": 110, "tokens": 7040, "loss": float("nan"), "val_loss": float("inf"),
                            "seconds": 58.0, "train_seconds": 55.0}) + "\n")
    r = compare(a + b)
    fin = r["groups"][0]["final_val_loss"]
    assert fin["mean"] is None and fin["non_finite"] == 1 and r["tests"][0]["p"] is None and not r["better"]
    out = cli("compare", *a, *b)
    assert "(1 runs not finite)" in out.stdout and "inf" not in out.stdout and "nan" not in out.stdout


def test_other_objectives_bad_lines_and_plot_names_are_refused(tmp_path, cli):
    lm = _run(tmp_path / "lm", optimizer="adamw", seed=0, finals=4.0)
    mdlm = _run(tmp_path / "mdlm", optimizer="adamw", seed=0, finals=4.0, family="masked-lm")
    with pytest.raises(UsageProblem, match="train different objectives .autoregressive LM, masked-lm."):
        compare([lm, mdlm])
    img = _run(tmp_path / "img", optimizer="adamw", seed=0, finals=0.1, family="ddpm", data={"spec": "builtin:moons"})
    r = cli("compare", lm, img)
    assert r.exit_code == 2 and "different objectives" in r.stderr and "internal error" not in r.stderr
    bad = _run(tmp_path / "bad", optimizer="adamw", seed=1, finals=4.0)
    with open(tmp_path / "bad" / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    r = cli("compare", lm, bad)
    assert r.exit_code == 2 and "line 11 of the metrics is not a JSON object" in r.stderr
    r = cli("compare", lm, "--plot", tmp_path / "x.txt")
    assert r.exit_code == 2 and "--plot" in r.stderr and not (tmp_path / "x.txt").exists()


def test_tables_show_a_dash_for_none(capsys):
    from gentool import console

    console.emit({"rmse": None, "p": 0.5}, as_json=False)
    out = capsys.readouterr().out
    assert "None" not in out and "rmse  —" in out
