"""What one trial reserves, and how many trials run at once (pure: no Ray).

With Ray Train V2 inside Ray Tune, Tune only schedules each trial's small driver function; the
trial's TorchTrainer then asks for its own placement group of workers, and the workers' Ray Data
preprocessing tasks need free CPUs beside them. Tune cannot see those, so left alone it would start
more trials than the cluster holds and they would sit waiting for placement groups (or time out).
`max_concurrent_trials` is therefore derived here from the cluster's GPUs (or CPUs) and what one
trial needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from training.config import TrainConfig


@dataclass(frozen=True)
class TrialDemand:
    """Logical resources one running trial holds: its driver, its workers, their data tasks."""

    cpus: float
    gpus: float

    def describe(self) -> str:
        text = f"{self.cpus:g} CPU"
        return text + (f" + {self.gpus:g} GPU" if self.gpus else "")


def trial_demand(train: TrainConfig, trial_cpus: float, data_cpus_per_worker: float) -> TrialDemand:
    """Resources of one trial: the trial function, `num_workers` Train workers, their data tasks.
    An elastic trial (`[min, max]`) is counted at `max`, so the trials run at once can all reach
    their full size; a lost node shrinks them."""
    workers = train.max_workers
    cpus = trial_cpus + workers * (train.cpus_per_worker + data_cpus_per_worker)
    gpus = float(workers) if train.use_gpu else 0.0
    return TrialDemand(cpus=cpus, gpus=gpus)


def max_concurrent_trials(
    cluster: Mapping[str, float], demand: TrialDemand, num_trials: int, requested: Optional[int] = None
) -> tuple[int, str]:
    """(trials to run at once, why) for a cluster's total resources (`ray.cluster_resources()`).

    GPU trials are bounded by GPUs (and CPUs), CPU trials by CPUs. Raises ValueError when not even
    one trial fits. `requested` (tune.max_concurrent_trials) wins when set, since an autoscaling
    cluster may grow beyond what it holds now; the reason then says how many fit today.
    """
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    by_cpu = math.floor(cpus / demand.cpus + 1e-9) if demand.cpus > 0 else num_trials
    fits = by_cpu
    why = f"{cpus:g} CPUs / {demand.cpus:g} per trial"
    if demand.gpus > 0:
        by_gpu = math.floor(gpus / demand.gpus + 1e-9)
        if by_gpu <= by_cpu:
            fits, why = by_gpu, f"{gpus:g} GPUs / {demand.gpus:g} per trial"
    if requested is not None:
        n = min(requested, num_trials)
        note = f"tune.max_concurrent_trials={requested}"
        if requested > fits:
            note += f" (the cluster holds {fits} such trials now: {why}; the rest wait for resources)"
        return n, note
    if fits < 1:
        raise ValueError(
            f"one trial needs {demand.describe()} (its Train workers, their data tasks and the trial's "
            f"own function) but the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower "
            f"train.num_workers / train.cpus_per_worker / tune.trial_cpus or use a bigger cluster"
        )
    n = min(fits, num_trials)
    return n, f"derived: {why} = {fits}, {num_trials} trials"


# run_training's own ceiling on preprocessing actors per worker.
MAX_PREPROCESS_ACTORS = 8


@dataclass(frozen=True)
class TrialPlan:
    concurrent: int  # max_concurrent_trials
    preprocess_actors: int  # train.num_preprocess_actors each trial runs with
    demand: TrialDemand  # what one trial holds with those actors
    why: str


def plan_trials(
    cluster: Mapping[str, float],
    train: TrainConfig,
    trial_cpus: float,
    num_trials: int,
    requested: Optional[int] = None,
) -> TrialPlan:
    """How many trials at once, and how many preprocessing actors per worker each one gets.

    `train.num_preprocess_actors` is kept when set. Otherwise run_training would size the actors
    from the whole cluster's free CPUs, as if it ran alone; in a sweep the trials share the
    cluster, so the concurrency is fixed first (with one actor per worker) and each trial then gets
    the actors its share of the CPUs pays for (1 to 8 per worker).
    """
    fixed = train.num_preprocess_actors
    workers = train.max_workers
    demand = trial_demand(train, trial_cpus, (fixed or 1) * train.preprocess_cpus)
    concurrent, why = max_concurrent_trials(cluster, demand, num_trials, requested)
    if fixed is not None:
        return TrialPlan(concurrent, fixed, demand, why)
    share = float(cluster.get("CPU", 0.0)) / max(concurrent, 1)
    spare = share - trial_cpus - workers * train.cpus_per_worker
    actors = int(max(1, min(MAX_PREPROCESS_ACTORS, math.floor(spare / (workers * train.preprocess_cpus) + 1e-9))))
    return TrialPlan(concurrent, actors, trial_demand(train, trial_cpus, actors * train.preprocess_cpus), why)
