"""The demo's report: report.md with its figures, and the closing summary on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(rows: list[dict[str, Any]], out: Path) -> None:
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Per-sample predictions that `clipray eval --dump-predictions` wrote, by key."""
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["key"]: row for row in rows}


def plot_predictions(shards_dir: Path, predictions: dict[str, Path], out: Path, count: int = 24) -> None:
    """A grid of held-out images, each titled with its predicted labels (red where wrong)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    by_task = {task: read_predictions(path) for task, path in predictions.items()}
    table = pq.read_table(sorted(shards_dir.glob("*.parquet")), columns=["key", "jpg"]) if shards_dir.is_dir() else None
    if table is None or table.num_rows == 0:
        return
    step = max(1, table.num_rows // count)
    keys, images = table.column("key").to_pylist()[::step][:count], table.column("jpg").to_pylist()[::step][:count]
    cols = 6
    fig, axes = plt.subplots(
        (len(keys) + cols - 1) // cols, cols, figsize=(cols * 1.9, 2.2 * ((len(keys) + cols - 1) // cols))
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, key, jpg in zip(axes.flat, keys, images):
        ax.imshow(Image.open(io.BytesIO(jpg)).convert("RGB"))
        preds = [by_task[t].get(key) for t in by_task]
        words = [p["pred_name"] for p in preds if p]
        wrong = any(p and not p["correct"] for p in preds)
        ax.set_title(" ".join(words), fontsize=9, color="crimson" if wrong else "black")
    fig.suptitle("held-out images with their zero-shot predictions (red: a wrong label)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _metric_rows(results: dict[str, dict]) -> list[tuple[str, str, float]]:
    rows = []
    for name, result in results.items():
        for metric, value in result.get("metrics", {}).items():
            if isinstance(value, (int, float)):
                rows.append((name, metric, float(value)))
    return rows


def _manifest_lines(manifests: dict[str, dict]) -> list[str]:
    lines = ["| split | input rows | accepted | rejected | reasons |", "|---|---|---|---|---|"]
    for split, m in manifests.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(m.get("reasons", {}).items())) or "-"
        lines.append(f"| {split} | {m['input_rows']} | {m['accepted']} | {m['rejected']} | {reasons} |")
    return lines


def write_report(
    root: Path,
    manifests: dict[str, dict],
    run_dir: Path,
    results: dict[str, dict],
    elapsed_s: float,
    figures: dict[str, str] | None = None,
) -> Path:
    """Write root/report.md (and loss_curve.png beside it); returns the report's path."""
    metrics = read_metrics(run_dir)
    plot_loss(metrics, root / "loss_curve.png")
    first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})
    lines = [
        "# clipray demo report",
        "",
        f"Wall time: {elapsed_s:.0f} s. Run directory: `{run_dir}`.",
        "",
        "## Pipeline",
        "",
        *_manifest_lines(manifests),
        "",
        "Manifests: " + ", ".join(f"`pipeline/{s}/manifest.json`" for s in manifests) + ".",
        "",
        "## Training",
        "",
        f"Steps: {last.get('step', '?')}, samples seen: {last.get('samples_seen', '?')}, "
        f"loss {first.get('loss', float('nan')):.3f} → {last.get('loss', float('nan')):.3f}, "
        f"logit scale {last.get('logit_scale', float('nan')):.1f}.",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Evaluation on the held-out split",
        "",
        "| evaluation | metric | value |",
        "|---|---|---|",
        *[f"| {name} | {metric} | {value:.3f} |" for name, metric, value in _metric_rows(results)],
        "",
        "Results JSON (CLIP_benchmark layout): " + ", ".join(f"`eval/{n}.json`" for n in results) + ".",
        "",
    ]
    for title, image in (figures or {}).items():
        lines += [f"### {title}", "", f"![{title}]({image})", ""]
    report = root / "report.md"
    report.write_text("\n".join(lines))
    return report


def print_summary(manifests: dict[str, dict], results: dict[str, dict], elapsed_s: float, report: Path) -> None:
    print()
    rows = [
        (f"pipeline {split}: accepted/input", f"{m['accepted']}/{m['input_rows']}") for split, m in manifests.items()
    ]
    rows += [(f"{name} {metric}", f"{value:.3f}") for name, metric, value in _metric_rows(results)]
    rows.append(("wall time (s)", f"{elapsed_s:.0f}"))
    width = max(len(what) for what, _ in rows) + 2
    print(f"  {'what':<{width}}{'value':>10}")
    print(f"  {'-' * (width + 10)}")
    for what, value in rows:
        print(f"  {what:<{width}}{value:>10}")
    print(f"\n  report: {report}")
