"""--form curve: the multi-power law's features against brute-force sums, recovery of a known curve, forecasts
from part of a run, --follow on a growing metrics.jsonl, and --stop-if-worse-than's exit status."""

import importlib.util
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gentool.errors import GentoolError, UsageProblem
from gentool.scaling.curve import BETA, GAMMA, TAU, Schedule, fit_curve
from gentool.scaling.study import StudyOptions, run_study
from gentool.train.schedules import lr_at

_spec = importlib.util.spec_from_file_location("_scaling_synth", Path(__file__).with_name("_synth.py"))
_synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synth)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_features_match_the_papers_sums(schedule):
    steps, warmup, lr = 90, 9, 2e-3
    eta = np.array([lr_at(i, total=steps, lr=lr, warmup=warmup, schedule=schedule) for i in range(steps)]) / lr
    sch = Schedule(eta, warmup, lr)
    ts = np.array([5, 9, 10, 11, 40, 77, 90])
    s, d = sch.features(ts)
    for t, s_t, d_t in zip(ts, s, d):
        assert s_t == pytest.approx(sum(eta[:t]), rel=1e-12)   # S1 + S_W: every step's rate so far
        # LD / B = sum over post-warmup steps k < t of (eta_{k-1} - eta_k) G(eta_k^-gamma sum_{j=k}^{t-1} eta_j)
        want = 0.0
        for k in range(warmup + 1, t):
            x = sum(eta[k:t]) / eta[k] ** GAMMA
            want += (eta[k - 1] - eta[k]) * (1 - (1 + x / TAU) ** -BETA)
        assert d_t == pytest.approx(want, rel=1e-10, abs=1e-15)
    if schedule == "constant":
        assert not d.any()
    with pytest.raises(GentoolError, match="outside the schedule"):
        sch.features(np.array([steps + 1]))


def test_a_known_curve_is_recovered_and_forecast(tmp_path):
    run, truth = _synth.curve_run(tmp_path, "full", noise=0.0, finished=True)
    sch_steps, t, y = _read(run)
    fit = fit_curve(sch_steps, t, y)   # noiseless: the law passes through every point fitted
    assert fit.rmse < 1e-4 * y.mean() and fit.predict(np.array([1200]))[0] == pytest.approx(truth, rel=1e-5)
    # from half of a noisy run: the final loss within 1%, inside the 95% interval
    run, truth = _synth.curve_run(tmp_path, "half", upto=600, noise=0.004, seed=3)
    res = run_study(StudyOptions([str(run / "metrics.jsonl")], form="curve", predict=["step=FINAL", "step=900"]))
    final, mid = res["predictions"]
    assert final["at"] == {"step": 1200} and mid["at"] == {"step": 900}
    assert final["loss"]["value"] == pytest.approx(truth, rel=0.01)
    lo, hi = final["loss"]["ci95"]
    assert lo <= truth <= hi and hi - lo < 0.1 * truth
    assert res["observed_step"] == 600 and res["fraction"] == 0.5 and not res["finished"]
    assert res["fit_steps"][1] == 600 and res["fit_steps"][0] > 300   # the later half of what exists


def _read(run):
    from gentool.scaling.forecast import _recipe, read_curve, schedule_of

    t, y, _ = read_curve(run, "loss")
    return schedule_of(_recipe(run)), t, y


def test_cli_forecast_stop_rule_and_errors(tmp_path, cli):
    # WSD before its decay: the annealing drop B comes from the prior (median 5% of the loss, ~0.12 here). With B
    # there the forecast is close; with B = 0.3 (2.5x the prior's median) it is off, but inside its interval.
    run, truth = _synth.curve_run(tmp_path, "r", upto=700, schedule="wsd", noise=0.002, params=(2.5, 1.2, 0.5, 0.12))
    r = cli("scale-fit", run / "metrics.jsonl", "--form", "curve", "--json", "-o", tmp_path / "fc")
    assert r.exit_code == 0, r.output
    pred = json.loads(r.stdout)["predictions"][0]["loss"]
    assert pred["value"] == pytest.approx(truth, rel=0.01) and pred["method"] == "profile likelihood"
    assert (tmp_path / "fc" / "plot.png").stat().st_size > 5000 and (tmp_path / "fc" / "fit.json").is_file()
    assert "has not decayed yet" in r.stderr
    far, far_truth = _synth.curve_run(tmp_path, "far", upto=700, schedule="wsd", noise=0.002)
    lo, hi = run_study(StudyOptions([str(far)], form="curve"))["predictions"][0]["loss"]["ci95"]
    assert lo <= far_truth <= hi
    # a reference that finished far lower: stop (exit 3); far higher: go on (exit 0)
    ref, _ = _synth.curve_run(tmp_path, "ref", params=(2.0, 1.2, 0.5, 0.3), finished=True, seed=1)
    r = cli("scale-fit", run, "--form", "curve", "--stop-if-worse-than", ref, "--bootstrap", "0")
    assert r.exit_code == 3 and "stop: the predicted final loss" in r.stderr and "verdict" in r.stdout
    r = cli("scale-fit", run, "--form", "curve", "--stop-if-worse-than", str(truth + 1.0), "--json",
            "--bootstrap", "0")
    assert r.exit_code == 0 and json.loads(r.stdout)["stop"]["worse"] is False
    # the run directory's name without .partial works while only RUN.partial exists
    assert cli("scale-fit", tmp_path / "r", "--form", "curve", "--bootstrap", "0").exit_code == 0
    r = cli("scale-fit", run, "--form", "curve", "--predict", "step=99999")
    assert r.exit_code == 2 and "outside the run's schedule" in r.stderr
    r = cli("scale-fit", run, "--follow")
    assert r.exit_code == 2 and "--form curve" in r.stderr
    early, _ = _synth.curve_run(tmp_path, "early", upto=100)
    r = cli("scale-fit", early, "--form", "curve")
    assert r.exit_code == 1 and "evaluations after the warmup" in r.stderr and "--eval-every" in r.stderr
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    r = cli("scale-fit", tmp_path / "bare" / "metrics.jsonl", "--form", "curve")
    assert r.exit_code == 2 and "no recipe" in r.stderr


def test_logged_learning_rate_that_differs_from_the_recipe_is_named(tmp_path):
    run, _ = _synth.curve_run(tmp_path, "odd", upto=800, lr_scale=0.5)
    res = run_study(StudyOptions([str(run)], form="curve", bootstrap=0))
    assert any("logged learning rate differs" in w for w in res["warnings"])
    assert res["predictions"][0]["loss"]["ci95"] is None


def _grow(run: Path, lines: list[str], start: int, delay: float, finish_as: Path | None = None) -> threading.Thread:
    """Append metrics lines one by one, as a training run does (a torn line first, then completed)."""
    def work():
        with open(run / "metrics.jsonl", "a") as f:
            for line in lines[start:]:
                time.sleep(delay)
                f.write(line[:10])
                f.flush()
                time.sleep(delay / 2)
                f.write(line[10:] + "\n")
                f.flush()
    th = threading.Thread(target=work, daemon=True)
    th.start()
    return th


def test_follow_reads_a_growing_run_until_it_ends(tmp_path):
    run, truth = _synth.curve_run(tmp_path, "g", steps=600, warmup=30, every=20, noise=0.002)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:12]) + "\n")
    th = _grow(run, lines, 12, 0.01)
    res = run_study(StudyOptions([str(run)], form="curve", follow=True, poll=0.02))
    th.join()
    assert res["observed_step"] == 600 and res["predictions"][0]["loss"]["value"] == pytest.approx(truth, rel=0.01)


def test_follow_stops_as_soon_as_the_forecast_is_worse(tmp_path):
    run, truth = _synth.curve_run(tmp_path, "bad", steps=1200, noise=0.002)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:12]) + "\n")
    th = _grow(run, lines, 12, 0.03)
    res = run_study(StudyOptions([str(run)], form="curve", follow=True, poll=0.02,
                                 stop_if_worse_than=str(truth - 0.3), alpha=0.05))
    assert res["stop"]["worse"] and res["observed_step"] < 1200   # stopped before the end
    assert res["stop"]["lower_bound"] > truth - 0.3
    th.join()


def test_alpha_must_be_a_level():
    with pytest.raises(UsageProblem, match="--alpha"):
        run_study(StudyOptions(["x"], form="curve", alpha=0.7))


def test_schedule_follows_the_recipes_cooldown():
    from gentool.scaling.forecast import schedule_of

    for cooldown in (0.1, 0.5, None):      # None: the recipe leaves the default (0.2) out, as train-lm's does
        train = {"steps": 1000, "lr": 2e-3, "warmup": 50, "schedule": "wsd", "min_lr_ratio": 0.1,
                 **({"cooldown": cooldown} if cooldown else {})}
        want = [lr_at(i, total=1000, lr=2e-3, warmup=50, schedule="wsd", decay_fraction=cooldown or 0.2) / 2e-3
                for i in range(1000)]
        assert np.allclose(schedule_of(train).eta, want, rtol=1e-12, atol=0)


def test_wsd_forecast_inside_a_long_cooldown(tmp_path):
    # WSD decaying over the last half, cut at 70% (200 steps into the decay) with a 12% annealing drop: the fit must
    # know the decay started at step 500 (not at 800, the default 20%)
    run, truth = _synth.curve_run(tmp_path, "cd", steps=1000, warmup=50, every=10, schedule="wsd", cooldown=0.5,
                                  upto=700, noise=0.004, seed=4)
    pred = run_study(StudyOptions([str(run)], form="curve"))["predictions"][0]["loss"]
    assert pred["value"] == pytest.approx(truth, rel=0.005)
    assert pred["ci95"][0] <= truth <= pred["ci95"][1]


def test_held_out_forecasts_from_half_the_run():
    # the held-out synthetic set of bench/forecast_synth.py (a law with another annealing shape than the
    # forecaster's, correlated noise, WSD with 10-50% cooldowns and cosine), forecast from 50%: the goal of issue 25
    spec = importlib.util.spec_from_file_location("_forecast_synth", Path(__file__).parents[2] / "bench" /
                                                  "forecast_synth.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = [bench.forecast(Path(tmp), r, 0.5) for r in bench.held_out_runs(1)]
    assert np.mean([abs(r["err"]) for r in res]) <= 0.02 and max(abs(r["err"]) for r in res) <= 0.03
    assert all(r["covered"] for r in res), [(r["truth"], r["ci"]) for r in res]
    # the prior on B admits its own 95% range, not one widened by the residuals' autocorrelation: no interval
    # reaches down to half the loss (before: to 0, B ~ 20x its prior median)
    assert all(r["ci"][0] > 0.5 * r["truth"] for r in res), [(r["truth"], r["ci"]) for r in res]
