"""The Ray wiring of a sweep: Ray Tune runs one Ray Train V2 run per trial, ASHA stops laggards.

Layout under `{tune.storage_path}/{tune.name}/` (the sweep folder):

    sweep_config.json        the model/train/tune sections the sweep started with (resume guard)
    runs/{trial_id}/         each trial's Ray Train run: checkpoints, metrics.jsonl, final/
    {trial_id}/              Ray Tune's trial folder: the reports Tune saw (progress.csv, result.json)
    experiment_state-*.json  Ray Tune's state, read by `Tuner.restore` when the driver died
    results.csv, best.json, sweep.png

How it follows Ray 2.60's Train-inside-Tune pattern: the trainable is a function that builds the
trial's `model`/`train` sections and calls `training.driver.run_training`, which fits a
`TorchTrainer` whose `RunConfig` carries our `TuneReportCallback` subclass; Tune reserves only
`tune.trial_cpus` for the function, the TorchTrainer reserves its workers itself, and
`max_concurrent_trials` keeps the sum inside the cluster.
The trial side (what runs in each trial's actor) is `trainable.py`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray import tune as rt
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from storage import Folder, FolderLock
from training.config import ModelConfig, TrainConfig, TuneConfig

from .checks import check_sweep, impossible_widths
from .plots import plot_sweep
from .resources import plan_trials
from .results import TrialRecord, best_config, best_json, format_table, results_csv, summarise, winner
from .space import count_trials, describe_space, param_space
from .storage import RUNS_DIR, sweep_folder
from .trainable import make_trainable, trial_dirname
from .trial import trial_values

log = logging.getLogger(__name__)

# tune keys a resumed sweep may change. (Concurrency and per-trial resources are restored with
# Ray Tune's state, so changing them would not take effect: they count as changes.)
RESUMABLE_TUNE_KEYS = {"retry_failed"}
SWEEP_CONFIG = "sweep_config.json"


# ----------------------------------------------------------------------------- driver side
def _node_memory_bytes() -> float:
    """Memory of the largest live node (Ray's task memory + object store), for the size check."""
    best = 0.0
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            best = max(best, float(res.get("memory", 0.0)) + float(res.get("object_store_memory", 0.0)))
    return best


def _fingerprint(model: ModelConfig, train: TrainConfig, tune: TuneConfig) -> dict:
    tune_part = {k: v for k, v in tune.model_dump(mode="json").items() if k not in RESUMABLE_TUNE_KEYS}
    return {"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json"), "tune": tune_part}


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _guard_resume(storage: Folder, fingerprint: dict, started_with: dict) -> Optional[dict]:
    """Write sweep_config.json on a first start (and return None); on a resume, refuse a changed
    config, else return what the sweep started with (its concurrency)."""
    from ray.tune import Tuner

    previous = storage.read_text(SWEEP_CONFIG)
    filesystem, path = storage.pyarrow()
    resumable = Tuner.can_restore(path, storage_filesystem=filesystem)
    if not resumable:
        storage.write_bytes(
            SWEEP_CONFIG, (json.dumps({**fingerprint, "started_with": started_with}, indent=2) + "\n").encode()
        )
        return None
    recorded = json.loads(previous) if previous is not None else {}
    changed = _diff_keys({k: recorded.get(k) for k in fingerprint}, fingerprint)
    if changed:
        raise ValueError(
            f"the sweep in {storage.url} was started with another config (differs in: {', '.join(changed)}); "
            f"resuming it would mix trials of two sweeps. Use a new tune.name, or delete {storage.url} to "
            f"start over"
        )
    return recorded.get("started_with", {})


def _error_text(error: BaseException) -> str:
    """'ExcType: message' of the exception a trial raised (Ray's wrappers unwrapped)."""
    cause = error
    while isinstance(cause, ray.exceptions.RayTaskError) and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        text = lines[-1]  # a worker's traceback: its last line is the exception
    else:
        text = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    return text[:500]


def _record(result, storage: Folder) -> TrialRecord:
    trial_id = Path(result.path).name
    history: list[dict] = []
    df = result.metrics_dataframe
    if df is not None and len(df):
        history = [
            {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in df.to_dict("records")
        ]
    run = f"{RUNS_DIR}/{trial_id}"
    steps = samples = None
    text = storage.read_text(f"{run}/metrics.jsonl")
    if text:
        for line in reversed(text.splitlines()):
            if line.strip():
                last = json.loads(line)
                steps, samples = last.get("step"), last.get("samples_seen")
                break
    elif history:
        steps, samples = history[-1].get("step"), history[-1].get("samples_seen")
    return TrialRecord(
        trial_id=trial_id,
        values=trial_values(result.config or {}),
        history=history,
        error=_error_text(result.error) if result.error is not None else None,
        completed=result.error is None and storage.exists(f"{run}/final/model.safetensors"),
        steps=steps,
        samples_seen=samples,
        run_dir=storage.full_url(run),
    )


def _scheduler(train: TrainConfig, tune: TuneConfig):
    if not tune.early_stopping:
        return FIFOScheduler(), "off"
    grace = tune.grace_period or max(1, int(train.samples / tune.reduction_factor**2))
    scheduler = ASHAScheduler(
        time_attr="samples_seen",
        max_t=train.samples,
        grace_period=grace,
        reduction_factor=tune.reduction_factor,
        brackets=1,
        # A trial reaching max_t has finished; stopping it there could cut
        # the writing of its final/ model.
        stop_last_trials=False,
    )
    rungs = asha_rungs(grace, tune.reduction_factor, train.samples)
    return scheduler, (
        f"ASHA on samples_seen: a trial may stop at {', '.join(map(str, rungs)) or 'no rung'} "
        f"samples when it trails the best 1/{tune.reduction_factor:g} there"
    )


def asha_rungs(grace: int, reduction_factor: float, max_t: int) -> list[int]:
    """The milestones (in samples) below max_t at which ASHA compares trials: grace * rf**k."""
    rungs, milestone = [], float(grace)
    while milestone < max_t:
        rungs.append(int(milestone))
        milestone *= reduction_factor
    return rungs


def absolute_local_paths(model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """The sections the trials get: local relative paths made absolute against the driver's working
    directory, because Ray Tune runs each trial in its own trial folder. Shard folders always;
    model JSON, checkpoint and zero-shot files when they exist here (else they are registered names).
    URLs (s3://...) stay as they are. results.csv and best.json keep the paths as the user wrote them."""

    def local_relative(path: str) -> bool:
        return "://" not in path and not os.path.isabs(path)

    def pinned(path: Optional[str], must_exist: bool) -> Optional[str]:
        if path is None or not local_relative(path) or (must_exist and not os.path.exists(path)):
            return path
        return os.path.abspath(path)

    model = model.model_copy(update={"name": pinned(model.name, True), "pretrained": pinned(model.pretrained, True)})
    train = train.model_copy(
        update={
            "data": [
                pinned(p, False) if isinstance(p, str) else p.model_copy(update={"path": pinned(p.path, False)})
                for p in train.data
            ],
            "val_data": [pinned(p, False) for p in train.val_data],
            **{
                key: pinned(getattr(train, key), True)
                for key in ("zeroshot_data", "zeroshot_classnames", "zeroshot_templates")
            },
        }
    )
    return model, train


def run_sweep(model: ModelConfig, train: TrainConfig, tune: TuneConfig) -> dict:
    """Run or resume the sweep; write results.csv, best.json, sweep.png; return the summary."""
    check_sweep(model, train, tune)
    if not ray.is_initialized():
        ray.init()
    storage = sweep_folder(tune, train)
    with FolderLock(storage, f"clipray tune {tune.name}"):
        return _run_sweep(model, train, tune, storage)


def _run_sweep(model: ModelConfig, train: TrainConfig, tune: TuneConfig, storage: Folder) -> dict:
    from ray.tune import Tuner

    num_trials = count_trials(tune)
    plan = plan_trials(ray.cluster_resources(), train, tune.trial_cpus, num_trials, tune.max_concurrent_trials)
    memory = _node_memory_bytes()
    scheduler, scheduler_text = _scheduler(train, tune)
    started_with = _guard_resume(storage, _fingerprint(model, train, tune), {"max_concurrent_trials": plan.concurrent})
    resuming = started_with is not None
    concurrency = (
        f"{started_with.get('max_concurrent_trials', '?')} trials at once, as when it started"
        if resuming
        else f"{plan.concurrent} trials at once ({plan.why})"
    )

    print(
        f"clipray tune: {'resuming' if resuming else 'starting'} sweep {storage.url}\n"
        f"  {num_trials} trials of {model.name}, each {train.samples} samples; metric {tune.metric} ({tune.mode})\n"
        f"{describe_space(tune)}\n"
        f"  {concurrency}; one trial holds {plan.demand.describe()} with {plan.preprocess_actors} "
        f"preprocessing actor(s) per worker\n"
        f"  early stopping: {scheduler_text}",
        flush=True,
    )
    for warning in impossible_widths(model, train, tune, memory):
        print(f"  warning: that trial will fail: {warning}", file=sys.stderr, flush=True)

    trial_model, trial_train = absolute_local_paths(model, train)
    sweep = {
        "model": trial_model.model_dump(mode="json"),
        "train": trial_train.model_dump(mode="json"),
        "metric": tune.metric,
        "runs_dir": storage.full_url(RUNS_DIR),
        "node_memory_bytes": memory,
        "preprocess_actors": plan.preprocess_actors,
    }
    trainable = rt.with_resources(make_trainable(sweep), {"CPU": tune.trial_cpus})
    sweep_fs, sweep_path = storage.pyarrow()
    remote_fs = None if storage.local else sweep_fs
    if resuming:
        tuner = Tuner.restore(
            sweep_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=tune.retry_failed,
            storage_filesystem=remote_fs,
        )
    else:
        tuner = Tuner(
            trainable,
            param_space=param_space(tune),
            tune_config=rt.TuneConfig(
                metric=tune.metric,
                mode=tune.mode,
                scheduler=scheduler,
                num_samples=tune.num_samples,
                max_concurrent_trials=plan.concurrent,
                reuse_actors=False,
                trial_name_creator=trial_dirname,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=rt.RunConfig(
                name=tune.name,
                storage_path=Folder(tune.storage_path, train).pyarrow()[1],
                storage_filesystem=remote_fs,
                failure_config=rt.FailureConfig(max_failures=0),
            ),
        )
    started = time.monotonic()
    grid = tuner.fit()
    elapsed = time.monotonic() - started
    return write_outputs(grid, storage, model, train, tune, elapsed)


def write_outputs(
    grid, storage: Folder, model: ModelConfig, train: TrainConfig, tune: TuneConfig, elapsed: float
) -> dict:
    """results.csv, sweep.png, best.json and the summary table from Ray Tune's ResultGrid."""
    records = sorted((_record(result, storage) for result in grid), key=lambda r: r.trial_id)
    rows = summarise(records, tune.metric, tune.mode, tune.early_stopping)
    best = winner(rows, tune.metric)
    outputs = {
        "results.csv": results_csv(rows, tune.metric).encode(),
        "sweep.png": plot_sweep(
            records,
            rows,
            tune.metric,
            tune.mode,
            base_temperature=train.temperature_init,
            base_width=model.width_mult,
            base_learn=train.learn_temperature,
            title=f"sweep {tune.name}",
        ),
    }
    best_fragment = None
    if best is not None:
        best_fragment = best_config(best, model, train, name=f"{tune.name}-best")
        outputs["best.json"] = best_json(best_fragment).encode()
    files = {}
    for name, data in outputs.items():
        storage.write_bytes(name, data)
        files[name] = storage.full_url(name)

    print(
        f"\nclipray tune: sweep {tune.name} done in {elapsed:.0f} s ({tune.metric}, {tune.mode})\n"
        + format_table(rows, tune.metric),
        flush=True,
    )
    for name, uri in files.items():
        print(f"  {name}: {uri}")
    if best is not None:
        print(f"  train the winner: clipray train --config {files['best.json']} --set train.samples=...")
    else:
        print("  no trial reported the metric: no best.json (see results.csv for why)", file=sys.stderr)
    return {
        "sweep_dir": storage.url,
        "metric": tune.metric,
        "mode": tune.mode,
        "trials": rows,
        "best": best,
        "best_config": best_fragment,
        "files": files,
        "elapsed_s": elapsed,
    }
