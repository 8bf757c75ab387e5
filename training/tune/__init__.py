"""Ray Tune sweeps over CLIP's temperature and width (and optionally lr and batch size).

`run_sweep(model, train, tune)` runs one Ray Train run per trial under
`{tune.storage_path}/{tune.name}/`, stops trailing trials with ASHA, and writes `results.csv`,
`best.json` and `sweep.png` there. The parts:

* `checks.py`: what would fail every trial, found before any starts (no Ray).
* `space.py`: the `tune` section -> Ray Tune's search space; trial counts.
* `trial.py`: a trial's values -> its `model` and `train` sections; the model-size check.
* `resources.py`: what one trial reserves, and how many trials the cluster holds at once.
* `results.py`: trial records -> `results.csv`, `best.json`, the terminal table.
* `plots.py`: `sweep.png` (metric over training for every trial, heat map over temperature x width).
* `runner.py`: the Ray wiring (Tuner, ASHA, the trial trainable, resume).
"""

from __future__ import annotations

from typing import Any


from .checks import check_sweep


def run_sweep(model: Any, train: Any, tune: Any) -> dict:
    """Run (or resume) the sweep; returns the summary dict (also printed as a table)."""
    from .runner import run_sweep as _run_sweep

    return _run_sweep(model, train, tune)


__all__ = ["check_sweep", "run_sweep"]
