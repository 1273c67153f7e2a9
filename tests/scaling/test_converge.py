"""A fit's convergence verdict comes from the objective at its answer, never from the optimiser's status flag: an
L-BFGS line search that stops ABNORMAL at machine precision (at the optimum; CPU-dependent) is converged, and a
run cut short far from the optimum is not, whatever the flag says."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from gentool.scaling import converge
from gentool.scaling.fit import fit_form

_spec = importlib.util.spec_from_file_location("_scaling_synth", Path(__file__).with_name("_synth.py"))
_synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synth)

_minimize, _least_squares = optimize.minimize, optimize.least_squares


def _chin_cols(seed=0):
    rows = _synth.chinchilla_rows(seed)
    return {k: np.array([r[c] for r in rows]) for k, c in (("n", "N"), ("d", "D"), ("y", "loss"))}


def _power_cols(seed=0):
    rows = _synth.power_rows(seed)
    return {"x": np.array([r["C"] for r in rows]), "y": np.array([r["loss"] for r in rows])}


def _sigmoid_cols():
    x = np.linspace(0.5, 4.5, 30)
    y = 0.25 + 0.65 / (1 + np.exp(3.0 * (x - 2.5))) + np.random.default_rng(1).normal(0, 0.01, x.size)
    return {"x": x, "y": y}


def _abnormal(*args, **kw):
    """minimize as on the CPU of the report: the same point, flagged as a failed line search."""
    r = _minimize(*args, **kw)
    r.success, r.status, r.message = False, 2, "ABNORMAL_TERMINATION_IN_LNSRCH"
    return r


def _max_nfev_flag(*args, **kw):
    """least_squares reporting 'max_nfev reached' (status 0, success False) at its true answer."""
    r = _least_squares(*args, **kw)
    r.success, r.status, r.message = False, 0, "The maximum number of function evaluations is exceeded."
    return r


def _cut_short(*args, **kw):
    """minimize stopped after 2 iterations (far from the optimum), but claiming success."""
    kw["options"] = {**kw.get("options", {}), "maxiter": 2}
    r = _minimize(*args, **kw)
    r.success, r.status = True, 0
    return r


def _ls_cut_short(*args, **kw):
    kw["max_nfev"] = 2
    r = _least_squares(*args, **kw)
    r.success, r.status = True, 1
    return r


def test_abnormal_line_search_at_the_optimum_is_converged(monkeypatch):
    cols = _chin_cols()
    ref = fit_form("chinchilla", cols)
    monkeypatch.setattr(optimize, "minimize", _abnormal)
    for init in (None, ref.params):      # from the grid, and started at the optimum itself
        fit = fit_form("chinchilla", cols, init=init)
        assert fit.converged and not any("converge" in w for w in fit.warnings), fit.warnings
        for k, v in ref.params.items():  # the same optimum (to the parameters' own precision, not bit for bit)
            assert fit.params[k] == pytest.approx(v, rel=1e-4), k


@pytest.mark.parametrize("form, cols", [("power", _power_cols), ("sigmoid", _sigmoid_cols)])
def test_least_squares_flag_is_not_the_verdict(monkeypatch, form, cols):
    c = cols()
    ref = fit_form(form, c)
    monkeypatch.setattr(optimize, "least_squares", _max_nfev_flag)
    fit = fit_form(form, c)
    assert fit.converged and not any("converge" in w for w in fit.warnings), fit.warnings
    assert fit.loss == pytest.approx(ref.loss, rel=1e-6)


def test_a_fit_cut_short_is_not_converged(monkeypatch):
    cols = _chin_cols()
    monkeypatch.setattr(optimize, "minimize", _cut_short)
    fit = fit_form("chinchilla", cols)
    assert not fit.converged and any("L-BFGS did not converge" in w for w in fit.warnings)
    monkeypatch.setattr(optimize, "least_squares", _ls_cut_short)   # (the clean sigmoid needs only 2 steps)
    fit = fit_form("power", _power_cols())
    assert not fit.converged and any("the power fit did not converge" in w for w in fit.warnings), fit.warnings


def test_polish_verdict_on_a_quadratic():
    # F(x) = |x - 1|^2 + 4 over 10 "points", 2 parameters; a restart that finds the minimum exactly
    def restart(x):
        return np.ones(2), 4.0

    x, f, ok, drop = converge.polish(restart, np.ones(2) + 1e-9, 4.0 + 2e-18, 10, 2, 0.0)
    assert ok and drop == pytest.approx(2e-18, abs=1e-17)     # far below 1% of a standard error
    x, f, ok, _ = converge.polish(restart, np.full(2, 2.0), 6.0, 10, 2, 0.0)
    assert ok and f == 4.0 and np.array_equal(x, np.ones(2))   # the restart's lower point is kept, then settles

    def creep(x):          # every restart still lowers F by 1% (an optimiser that never arrives)
        return x * 0.9, 4.0 + 0.99 * (float(np.sum((x - 1) ** 2)))

    _, _, ok, drop = converge.polish(creep, np.full(2, 3.0), 12.0, 10, 2, 0.0)
    assert not ok and drop > converge.tolerance(12.0, 10, 2, 0.0)
    # the tolerance: 1% of a standard error <=> (0.01)^2 F / (n - p), plus the rounding floor
    assert converge.tolerance(8.0, 10, 2, 1e-30) == pytest.approx(1e-4 * 8.0 / 8 + 1e-30)
