"""Whether a fit reached its optimum: one verdict for every optimiser call whose result is reported as converged.

An optimiser's own status flag is not that verdict. L-BFGS-B with tight tolerances stops in its line search at
machine precision ("ABNORMAL_TERMINATION_IN_LNSRCH"), at the optimum, and whether it calls that a success depends on
the CPU's floating point; least_squares stops on a relative reduction of 1e-8 whatever is left. So the verdict is the
relative change of the objective when the optimiser is restarted from its answer (a polish): at an optimum no restart
lowers it by more than rounding, anywhere else it does. A lower point found by the polish is kept.

The tolerance follows from what the fit is for: near the optimum a least-squares objective F rises by F / (n - p)
(one residual variance) when a parameter moves one standard error, so a remaining decrease below
RTOL_SE^2 F / (n - p) means every parameter is within RTOL_SE = 1% of a standard error of the optimum. `floor` is the
objective's own rounding level (noiseless data: F is 0 up to the residuals' rounding), below which no change counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

RTOL_SE = 0.01       # the verdict's resolution, in standard errors of the parameters
ROUNDS = 3           # polishes before a fit that still improves is reported as not converged


def tolerance(f: float, n: int, p: int, floor: float) -> float:
    """The largest decrease of the objective f (n points, p parameters) still called 'at the optimum'."""
    return RTOL_SE ** 2 * abs(f) / max(n - p, 1) + floor


def polish(restart: Callable[[np.ndarray], tuple[np.ndarray, float]], x: np.ndarray, f: float, n: int, p: int,
           floor: float) -> tuple[np.ndarray, float, bool, float]:
    """Restart the optimiser from x (objective f) until a restart no longer lowers the objective by more than
    `tolerance`, at most ROUNDS times. Returns (x, f) of the lowest point, the verdict, and the last decrease."""
    drop = math.inf
    for _ in range(ROUNDS):
        x_new, f_new = restart(np.asarray(x, float))
        drop = f - f_new if math.isfinite(f_new) else 0.0
        if drop > 0:
            x, f = np.asarray(x_new, float), float(f_new)
        if drop <= tolerance(f, n, p, floor):
            return x, f, True, max(drop, 0.0)
    return x, f, False, drop
