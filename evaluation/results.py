"""What an evaluation returns, and its files: CLIP_benchmark's JSON and per-sample predictions.

The JSON is CLIP_benchmark's layout, so its `clip_benchmark build` turns our files into the same
CSV as its own: `{"dataset", "model", "pretrained", "task", "metrics", "language"}` where `task` is
CLIP_benchmark's name (`zeroshot_classification`, `zeroshot_retrieval`, `linear_probe`) and
`metrics` holds only numbers. What CLIP_benchmark has no field for (samples counted, images
skipped and why, the linear probe's C search) sits under `clipray`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from storage import StorageConfig, write_file

CLIP_BENCHMARK_TASK = {
    "zeroshot": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
}
MAX_SKIP_EXAMPLES = 20


@dataclass
class EvalResult:
    task: str  # eval.task: zeroshot | retrieval | linear_probe
    metrics: dict[str, float]
    num_samples: int  # images scored (after skips)
    skipped: dict[str, Any] = field(default_factory=lambda: skipped_summary([], []))
    details: dict[str, Any] = field(default_factory=dict)
    predictions: Optional[dict[str, np.ndarray]] = None  # per-sample columns, same length
    confusion: Optional[np.ndarray] = None  # [C, C], classification only
    classnames: Optional[list[str]] = None
    dataset_name: Optional[str] = None  # the set's own name (a wds set's CLIP_benchmark name), if any


def skipped_summary(keys: list[str], errors: list[str]) -> dict[str, Any]:
    """{"count", "reasons": {exception type: count}, "examples": [{"key", "error"}]} of skipped images."""
    reasons = Counter(err.split(":", 1)[0] for err in errors)
    return {
        "count": len(keys),
        "reasons": dict(sorted(reasons.items())),
        "examples": [{"key": k, "error": e} for k, e in list(zip(keys, errors))[:MAX_SKIP_EXAMPLES]],
    }


def clip_benchmark_json(result: EvalResult, *, dataset: str, model: str, pretrained: str = "") -> dict[str, Any]:
    """The result as CLIP_benchmark writes it (plus our `clipray` block)."""
    metrics = {k: float(v) for k, v in result.metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": CLIP_BENCHMARK_TASK[result.task],
        "metrics": metrics,
        "language": "en",
        "clipray": {
            "task": result.task,
            "num_samples": result.num_samples,
            "skipped": result.skipped,
            **_jsonable(result.details),
        },
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(obj: dict[str, Any], path: str, storage: Optional[StorageConfig] = None) -> None:
    """Write `obj` as indented JSON to `path` (local or remote), atomically."""
    write_file(path, (json.dumps(obj, indent=2) + "\n").encode(), storage)


def sibling_path(output: str, suffix: str) -> str:
    """`out/results.json` + `.predictions.jsonl` -> `out/results.predictions.jsonl`."""
    stem = output[:-5] if output.lower().endswith(".json") else output
    return stem + suffix


def write_predictions(predictions: dict[str, np.ndarray], path: str, storage: Optional[StorageConfig] = None) -> int:
    """One JSON object per sample (JSON Lines), written atomically; returns the number of rows."""
    columns = {k: _jsonable(np.asarray(v)) for k, v in predictions.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    lines = "".join(json.dumps({k: v[i] for k, v in columns.items()}) + "\n" for i in range(n))
    write_file(path, lines.encode(), storage)
    return n
