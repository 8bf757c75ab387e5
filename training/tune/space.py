"""The `tune` section -> Ray Tune's search space.

A list is a grid (every value is tried); `{loguniform: [low, high]}`, `{uniform: [low, high]}`
and `{choice: [...]}` are drawn `tune.num_samples` times. The grid is crossed with itself
`num_samples` times too, so 3 widths x 2 temperatures x num_samples 1 = 6 trials.
"""

from __future__ import annotations

import math
from typing import Any

from training.config import TuneConfig

# Repeats of the same grid point would be the same run twice; with num_samples > 1 each trial
# draws its own train.seed so that repeats measure seed noise.
SEED_AXIS = "seed"


def count_trials(tune: TuneConfig) -> int:
    """How many trials the sweep runs: grid points x num_samples."""
    grid = math.prod(len(space) for space in tune.axes().values() if isinstance(space, list))
    return grid * tune.num_samples


def param_space(tune: TuneConfig) -> dict[str, Any]:
    """Ray Tune's param_space for the searched axes (plus a seed axis when num_samples > 1)."""
    from ray import tune as rt

    out: dict[str, Any] = {}
    for axis, space in tune.axes().items():
        if isinstance(space, list):
            out[axis] = rt.grid_search(space)
            continue
        ((kind, values),) = space.items()
        if kind == "loguniform":
            out[axis] = rt.loguniform(*values)
        elif kind == "uniform":
            out[axis] = rt.uniform(*values)
        else:
            out[axis] = rt.choice(values)
    if tune.num_samples > 1:
        out[SEED_AXIS] = rt.randint(0, 2**31 - 1)
    return out


def describe_space(tune: TuneConfig) -> str:
    """One line per axis, for the start-of-sweep banner."""
    lines = []
    for axis, space in tune.axes().items():
        if isinstance(space, list):
            lines.append(f"  {axis}: grid {space}")
        else:
            ((kind, values),) = space.items()
            lines.append(f"  {axis}: {kind} {values}")
    if not lines:
        lines.append("  (no axis: every trial runs the train section as it is)")
    return "\n".join(lines)
