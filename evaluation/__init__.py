"""evaluation: zero-shot classification, retrieval and linear probe of a CLIP, CLIP_benchmark-compatible.

Public entry points (imported lazily, so that `evaluation.config` stays light):
`run_evaluation(cfg)` (the CLI's runner), `run_suite(cfg)` (`--suite`), `evaluate_dataset(model, cfg)`,
`evaluate_zeroshot(model, images, labels, classnames, templates)`,
`evaluate_retrieval(model, images, captions)`, `evaluate_linear_probe(...)`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_evaluation": "evaluation.run",
    "evaluate_dataset": "evaluation.run",
    "run_suite": "evaluation.suite",
    "evaluate_zeroshot": "evaluation.zeroshot",
    "build_classifier": "evaluation.zeroshot",
    "evaluate_retrieval": "evaluation.retrieval",
    "retrieval_metrics": "evaluation.retrieval",
    "evaluate_linear_probe": "evaluation.linear_probe",
    "linear_probe": "evaluation.linear_probe",
    "classification_metrics": "evaluation.classification",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
