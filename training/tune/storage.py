"""The sweep folder `{tune.storage_path}/{tune.name}`, local or remote, reached with the `train`
section's storage settings, so that Ray Tune's state, the trials' Ray Train runs under `runs/` and
our result files all live on one filesystem."""

from __future__ import annotations

from storage import Folder, join
from training.config import TrainConfig, TuneConfig

RUNS_DIR = "runs"


def sweep_folder(tune: TuneConfig, train: TrainConfig) -> Folder:
    return Folder(join(tune.storage_path, tune.name), train)
