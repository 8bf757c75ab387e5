"""The trial side of a sweep: the function trainable each trial's actor runs, which builds the
trial's `model`/`train` sections and calls `training.driver.run_training` with a callback that
reports the sweep's metric to Ray Tune.

Stopping a trial cleanly: Ray Tune stops a trial by ending its actor. The TorchTrainer's
controller dies with it, but the placement group of its workers outlives it (Ray scopes it to the
job), and Ray Train's own cleaner needs the dashboard's state API, which a cluster started with
`include_dashboard=False` does not serve. So the trainable aborts the controller itself (which
removes the workers and their placement group) in `cleanup()`, which Tune calls before it lets the
actor go; the callback hands the controller's handle to the trainable through a small queue.
"""

from __future__ import annotations

import logging

import ray
from ray import tune as rt
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.trainable.function_trainable import wrap_function
from ray.util.queue import Queue

from training.config import ModelConfig, TrainConfig

from .trial import check_model_fits, trial_sections, trial_values

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 60.0

# Filled in the trial's actor process: trial_id -> the queue the callback puts the controller in.
_CONTROLLER_BOXES: dict[str, Queue] = {}


class ReportToTune(TuneReportCallback):
    """Ray Tune's report callback that forwards only reports carrying the sweep's metric.

    The training runner reports every `train.log_every` steps and adds validation metrics every
    `train.val_every`; Tune (and ASHA) should see the validation points only. On its first report
    it also hands its controller's handle to the trial, so the trial can abort the run when Tune
    stops it (see the module docstring).
    """

    def __init__(self, metric: str, controller_box: Queue):
        super().__init__()
        self._metric = metric
        self._box = controller_box
        self._announced = False

    def after_report(self, run_context, metrics, checkpoint):
        if not self._announced:
            self._announced = True
            try:
                self._box.put(ray.get_runtime_context().current_actor, timeout=30)
            except Exception as exc:  # the trial still runs; only its clean abort is lost
                log.warning("could not hand the Train controller to the trial: %s", exc)
        if metrics and self._metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _run_trial(config: dict, sweep: dict) -> None:
    """One trial: its sections -> one Ray Train run reporting to Tune (runs in the trial's actor)."""
    from training.driver import run_training

    trial_id = rt.get_context().get_trial_id()
    model, train = trial_sections(
        ModelConfig.model_validate(sweep["model"]),
        TrainConfig.model_validate(sweep["train"]),
        trial_values(config),
        runs_dir=sweep["runs_dir"],
        run_name=trial_id,
    )
    train = train.model_copy(update={"num_preprocess_actors": sweep["preprocess_actors"]})
    check_model_fits(model, train, sweep["node_memory_bytes"])
    box = Queue(maxsize=1, actor_options={"num_cpus": 0})
    _CONTROLLER_BOXES[trial_id] = box
    run_training(model, train, callbacks=[ReportToTune(sweep["metric"], box)])


def _abort_training(trial_id: str) -> None:
    """Abort the trial's Train controller if it still runs (removes its workers' placement group)."""
    box = _CONTROLLER_BOXES.pop(trial_id, None)
    if box is None:
        return
    try:
        controller = box.get_nowait()
    except Exception:  # no report yet, or the queue is gone: nothing was handed over
        return
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except ray.exceptions.RayActorError:
        pass  # abort() ends the controller's process, or it had already exited: both fine
    except ray.exceptions.GetTimeoutError:
        log.warning("trial %s: the Train controller did not abort within %.0f s", trial_id, ABORT_TIMEOUT_S)


def make_trainable(sweep: dict) -> type:
    """The sweep's trainable: a function trainable over `sweep` (the base sections, the metric,
    where runs go, the per-trial data actors), plus a cleanup that stops its TorchTrainer before
    Tune ends the trial's actor. `sweep` is closed over rather than put in the param space, so
    trial configs (and Tune's tables) hold only the searched values."""

    def clip_trial(config: dict) -> None:
        _run_trial(config, sweep)

    class SweepTrial(wrap_function(clip_trial)):
        def cleanup(self):
            _abort_training(self.trial_id)
            super().cleanup()

    return SweepTrial


def trial_dirname(trial) -> str:
    """Trial folders named by the trial id alone (run names match them under runs/)."""
    return trial.trial_id
