"""Human-readable outputs beside the results JSON: a Markdown summary and, for classification, a
confusion-matrix PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np

from evaluation.results import EvalResult
from storage import StorageConfig, write_file

MAX_LABELLED_CLASSES = 30  # tick labels and per-class rows beyond this would be unreadable
WORST_CLASSES = 10


def markdown_summary(result: EvalResult, obj: dict[str, Any], png_name: Optional[str] = None) -> str:
    lines = [
        f"# Evaluation: {obj['task']} on {obj['dataset']}",
        "",
        f"- model: `{obj['model']}` (`{obj['pretrained']}`)" if obj["pretrained"] else f"- model: `{obj['model']}`",
        f"- samples scored: {result.num_samples}",
        f"- skipped: {result.skipped['count']}"
        + (
            " (" + ", ".join(f"{k}: {v}" for k, v in result.skipped["reasons"].items()) + ")"
            if result.skipped.get("reasons")
            else ""
        ),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in obj["metrics"].items()]
    if result.task == "linear_probe" and result.details.get("C_search"):
        lines += [
            "",
            "Regularisation search (validation split):",
            "",
            "| C | val acc1 | val log-loss |",
            "|---|---|---|",
        ]
        for t in sorted(result.details["C_search"], key=lambda t: t["C"]):
            lines.append(f"| {t['C']:.3g} | {t['val_acc1']:.4f} | {t['val_log_loss']:.4f} |")
    if result.confusion is not None and result.classnames:
        cm = result.confusion
        support = cm.sum(axis=1)
        recall = np.divide(np.diag(cm), support, out=np.zeros(len(cm)), where=support > 0)
        present = np.flatnonzero(support > 0)
        rows = (
            present
            if len(present) <= MAX_LABELLED_CLASSES
            else present[np.argsort(recall[present], kind="stable")[:WORST_CLASSES]]
        )
        title = (
            "Per-class recall"
            if len(present) <= MAX_LABELLED_CLASSES
            else f"The {WORST_CLASSES} classes with the lowest recall"
        )
        lines += ["", f"{title}:", "", "| class | samples | recall | most often predicted as |", "|---|---|---|---|"]
        for c in rows:
            off = cm[c].copy()
            off[c] = -1
            confused = result.classnames[int(off.argmax())] if off.max() > 0 else "-"
            lines.append(f"| {result.classnames[c]} | {support[c]} | {recall[c]:.3f} | {confused} |")
    if png_name:
        lines += ["", f"![confusion matrix]({png_name})"]
    return "\n".join(lines) + "\n"


def confusion_png(confusion: np.ndarray, classnames: list[str], title: str) -> bytes:
    """PNG bytes of the row-normalised confusion matrix (true class rows, predicted columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    support = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    n = len(classnames)
    size = min(4 + 0.35 * n, 16) if n <= MAX_LABELLED_CLASSES else 10
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), classnames, rotation=90)
        ax.set_yticks(range(n), classnames)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if confusion[i, j]:
                        ax.text(
                            j,
                            i,
                            str(confusion[i, j]),
                            ha="center",
                            va="center",
                            color="white" if norm[i, j] > 0.5 else "black",
                            fontsize=8,
                        )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(
    result: EvalResult,
    obj: dict[str, Any],
    md_path: str,
    png_path: Optional[str],
    storage: Optional[StorageConfig] = None,
) -> None:
    png_name = None
    if png_path and result.confusion is not None and result.classnames:
        title = f"{obj['task']} on {obj['dataset']}: acc1 {obj['metrics'].get('acc1', float('nan')):.3f}"
        write_file(png_path, confusion_png(result.confusion, result.classnames, title), storage)
        png_name = png_path.rsplit("/", 1)[-1]
    write_file(md_path, markdown_summary(result, obj, png_name).encode("utf-8"), storage)
