"""Checks a sweep runs before any trial starts (no Ray needed, so the CLI may call them first).

`check_sweep` raises, naming the key, for what would fail every trial: an unknown model, missing
shards, a metric the trials cannot report, an ASHA grace period as long as the run.
`impossible_widths` lists the grid widths whose model cannot fit a node: those trials will fail
(and be reported as failed) while the others run, so the driver only warns about them.
"""

from __future__ import annotations

from pydantic import ValidationError

from training.config import VALIDATION_METRICS, ZEROSHOT_METRICS, ModelConfig, TrainConfig, TuneConfig

from .trial import check_model_fits, trial_sections


def check_sweep(model: ModelConfig, train: TrainConfig, tune: TuneConfig) -> None:
    """Everything that would make every trial fail, found before any trial starts."""
    from training.ingest import list_shards, list_training_shards
    from training.model import get_model_config

    get_model_config(model.name)  # raises naming the model when it is neither registered nor a JSON
    list_training_shards(train.data, train, what="train.data")
    if train.val_every is None or (tune.metric in VALIDATION_METRICS and not train.val_data):
        raise ValueError(
            f"tune.metric '{tune.metric}' is measured at validations: set train.val_data (held-out shard "
            f"folders) and train.val_every (steps between validations) so that every trial reports it"
        )
    if tune.metric in ZEROSHOT_METRICS and not train.zeroshot_data:
        raise ValueError(
            f"tune.metric '{tune.metric}' is a zero-shot accuracy: set train.zeroshot_data "
            f"(a labelled set) so that validations measure it"
        )
    if train.val_data:
        list_shards(train.val_data, train, what="train.val_data")
    batch_space = tune.batch_size
    batches = batch_space if isinstance(batch_space, list) else (batch_space or {}).get("choice", [])
    for batch in batches:  # each must make a valid train section (divisible by the workers, ...)
        try:
            trial_sections(model, train, {"batch_size": batch}, runs_dir="-", run_name="-")
        except ValidationError as exc:
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(f"tune.batch_size {batch} cannot run: {why}") from None
    if tune.grace_period is not None and tune.early_stopping and tune.grace_period >= train.samples:
        raise ValueError(
            f"tune.grace_period {tune.grace_period} samples is not below train.samples {train.samples}: "
            f"ASHA could never stop a trial; lower tune.grace_period or set tune.early_stopping: false"
        )


def impossible_widths(model: ModelConfig, train: TrainConfig, tune: TuneConfig, memory: float) -> list[str]:
    """Why each grid width whose model cannot fit `memory` bytes will fail its trials (in grid order)."""
    if not isinstance(tune.width_mult, list):
        return []
    reasons = []
    for width in tune.width_mult:
        m, t = trial_sections(model, train, {"width_mult": width}, runs_dir="-", run_name="-")
        try:
            check_model_fits(m, t, memory)
        except MemoryError as exc:
            reasons.append(str(exc))
    return reasons
