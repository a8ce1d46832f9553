"""TEAL's greedy allocation of sparsity (Liu et al. 2024, §4.2), one place for it.

Each *curve* is one stage of one layer (a layer's input channels, its neurons, its
predictor's recall): points of (share of the model's FFN bytes saved, error), the
first the stage's starting point, savings increasing. From every curve's first point,
the greedy repeatedly advances the one curve whose next point costs the least error
per byte saved, recording where the model-wide saving first reaches each target.
Errors of different curves are taken as additive; a step that lowers an error costs
nothing.
"""

from typing import List, Sequence, Tuple

import numpy as np

from .errors import FlashError

Curve = Tuple[np.ndarray, np.ndarray]  # (saved, error), one point per setting


def greedy(curves: Sequence[Curve], targets: Sequence[float]) -> List[np.ndarray]:
    """For each target (ascending), the index of every curve's chosen point."""
    at = np.zeros(len(curves), int)

    def cost(i: int) -> float:
        saved, error = curves[i]
        k = at[i]
        if k + 1 >= len(saved):
            return np.inf
        gain = max(float(saved[k + 1] - saved[k]), 1e-12)
        return max(float(error[k + 1] - error[k]), 0.0) / gain

    total = float(sum(saved[0] for saved, _ in curves))
    out = []
    for target in sorted(targets):
        while total < target - 1e-9:
            i = min(range(len(curves)), key=cost)
            if not np.isfinite(cost(i)):
                reach = sum(float(saved[-1]) for saved, _ in curves)
                raise FlashError(
                    f"sparsity {target:g} is beyond what was measured (at most "
                    f"{reach:.2f} of the FFN bytes can be left unused)"
                )
            saved = curves[i][0]
            total += float(saved[at[i] + 1] - saved[at[i]])
            at[i] += 1
        out.append(at.copy())
    return out
