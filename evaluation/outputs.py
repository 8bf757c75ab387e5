"""The files of one evaluation: CLIP_benchmark's JSON at `eval.output`, the Markdown report and
confusion matrix beside it, the per-sample predictions; and the one summary line printed."""

from __future__ import annotations

import posixpath

from evaluation.config import EvalConfig
from evaluation.results import EvalResult, clip_benchmark_json, sibling_path, write_json, write_predictions


def model_label(cfg: EvalConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    path = (cfg.model or "").rstrip("/")
    if not path:
        return "in-memory"
    parts = path.split("/")
    # A run's final/ folder says little on its own: keep the run's name with it.
    return "/".join(parts[-2:]) if parts[-1] == "final" and len(parts) > 1 else parts[-1]


def write_outputs(result: EvalResult, cfg: EvalConfig) -> dict:
    """CLIP_benchmark's JSON of `result`; written to cfg.output with its report and predictions when set."""
    dataset_name = cfg.dataset_name or result.dataset_name or posixpath.basename(cfg.dataset.rstrip("/"))
    obj = clip_benchmark_json(result, dataset=dataset_name, model=model_label(cfg), pretrained=cfg.model or "")
    if cfg.output:
        write_json(obj, cfg.output, cfg)
        if cfg.report:
            from evaluation.report import write_report

            write_report(
                result,
                obj,
                sibling_path(cfg.output, ".md"),
                sibling_path(cfg.output, ".confusion.png") if result.confusion is not None else None,
                cfg,
            )
        if cfg.dump_predictions and result.predictions is not None:
            write_predictions(result.predictions, sibling_path(cfg.output, ".predictions.jsonl"), cfg)
    return obj


def print_summary(obj: dict) -> None:
    metrics = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in obj["metrics"].items())
    skipped = obj["clipray"]["skipped"]["count"]
    print(
        f"eval {obj['task']} on {obj['dataset']}: {metrics} "
        f"({obj['clipray']['num_samples']} samples, {skipped} skipped)"
    )
