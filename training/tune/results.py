"""Trial records -> `results.csv`, `best.json` and the terminal summary table (pure, no Ray).

A trial ends in one of four states (the `status` column):

* `completed`: its Ray Train run trained `train.samples` samples and wrote `final/`;
* `early_stopped`: ASHA stopped it at a rung because its metric trailed the others there;
* `failed`: it raised (the `stop_reason` column holds the error), the sweep went on without it;
* `incomplete`: it neither finished nor failed (e.g. a sweep interrupted before it ran).

The winner is the best final metric among completed trials (among all trials that reported the
metric when none completed), so a trial stopped at a third of the budget cannot win on a value
measured earlier than the others'.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from training.config import TUNE_AXES, ModelConfig, TrainConfig

from .space import SEED_AXIS
from .trial import trial_sections

STATUSES = ("completed", "early_stopped", "failed", "incomplete")


@dataclass
class TrialRecord:
    """What the sweep knows of one trial once Ray Tune is done with it."""

    trial_id: str
    values: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)  # reports Tune saw, in order
    error: Optional[str] = None  # "ExcType: message" when the trial raised
    completed: bool = False  # its run wrote final/
    steps: Optional[int] = None  # last optimizer step the run reached
    samples_seen: Optional[int] = None
    run_dir: str = ""

    def metric_series(self, metric: str) -> list[tuple[float, float]]:
        """[(samples_seen, value)] of every report carrying `metric` (step when samples absent)."""
        out = []
        for row in self.history:
            value = _number(row.get(metric))
            x = _number(row.get("samples_seen", row.get("step")))
            if value is not None and x is not None:
                out.append((x, value))
        return out


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def status_of(record: TrialRecord, early_stopping: bool) -> tuple[str, str]:
    """(status, stop_reason) of a trial."""
    if record.error:
        return "failed", f"failed: {record.error}"
    if record.completed:
        return (
            "completed",
            f"trained to the budget ({record.samples_seen} samples)"
            if record.samples_seen is not None
            else "trained to the budget",
        )
    if record.history and early_stopping:
        last = record.history[-1]
        at = last.get("samples_seen", last.get("step"))
        return "early_stopped", f"stopped by ASHA at {at} samples: its metric trailed the rung"
    if record.history:
        return "incomplete", "reported metrics but did not write final/ (interrupted?)"
    return "incomplete", "did not report (not run, or interrupted before its first report)"


def summarise(records: Sequence[TrialRecord], metric: str, mode: str, early_stopping: bool = True) -> list[dict]:
    """One row per trial, best first: rank, trial_id, status, stop_reason, values, metrics, progress."""
    sign = 1.0 if mode == "min" else -1.0
    rows = []
    for record in records:
        status, reason = status_of(record, early_stopping)
        series = [v for _, v in record.metric_series(metric)]
        final = series[-1] if series else None
        best = (min(series) if mode == "min" else max(series)) if series else None
        rows.append(
            {
                "trial_id": record.trial_id,
                "status": status,
                "stop_reason": reason,
                **{k: record.values.get(k) for k in (*TUNE_AXES, SEED_AXIS) if k in record.values},
                f"final_{metric}": final,
                f"best_{metric}": best,
                "steps": record.steps,
                "samples_seen": record.samples_seen,
                "run_dir": record.run_dir,
            }
        )
    any_completed = any(r["status"] == "completed" and r[f"final_{metric}"] is not None for r in rows)

    def key(row: dict) -> tuple:
        final = row[f"final_{metric}"]
        eligible = final is not None and (row["status"] == "completed" or not any_completed)
        tier = 0 if eligible else (1 if final is not None and row["status"] != "failed" else 2)
        return (tier, sign * final if final is not None else math.inf, row["trial_id"])

    rows.sort(key=key)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return [{"rank": r.pop("rank"), **r} for r in rows]


def winner(rows: Sequence[dict], metric: str) -> Optional[dict]:
    """The rank-1 row when it has a final metric and did not fail; else None."""
    if rows and rows[0][f"final_{metric}"] is not None and rows[0]["status"] != "failed":
        return rows[0]
    return None


def columns(rows: Sequence[dict], metric: str) -> list[str]:
    axes = [k for k in (*TUNE_AXES, SEED_AXIS) if any(k in r for r in rows)]
    return [
        "rank",
        "trial_id",
        "status",
        "stop_reason",
        *axes,
        f"final_{metric}",
        f"best_{metric}",
        "steps",
        "samples_seen",
        "run_dir",
    ]


def results_csv(rows: Sequence[dict], metric: str) -> str:
    """results.csv as text: one row per trial, header first."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows, metric), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def best_config(row: dict, model: ModelConfig, train: TrainConfig, *, name: str) -> dict:
    """The winning trial as a job-config fragment `{"model": ..., "train": ...}` for `clipray train`.

    The train section keeps the sweep's own storage_path and takes `name` as its run name, so the
    full run neither overwrites nor resumes a trial's run.
    """
    values = {k: row[k] for k in (*TUNE_AXES, SEED_AXIS) if row.get(k) is not None}
    best_model, best_train = trial_sections(model, train, values, runs_dir=train.storage_path, run_name=name)
    return {"model": best_model.model_dump(mode="json"), "train": best_train.model_dump(mode="json")}


def best_json(fragment: dict) -> str:
    return json.dumps(fragment, indent=2) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict], metric: str, max_reason: int = 48) -> str:
    """The end-of-sweep summary: a fixed-width table, best first, winner marked with `*`."""
    cols = [c for c in columns(rows, metric) if c not in ("run_dir", "stop_reason")] + ["stop_reason"]
    best = winner(rows, metric)
    table = [cols]
    for row in rows:
        cells = [_cell(row.get(c)) for c in cols]
        reason = cells[-1]
        cells[-1] = reason if len(reason) <= max_reason else reason[: max_reason - 1] + "…"
        if best is not None and row is best:
            cells[0] = "*" + cells[0]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines.append("")
    lines.append(", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n) or "no trials")
    return "\n".join(lines)
