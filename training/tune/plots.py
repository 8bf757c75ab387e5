"""`sweep.png`: the metric over training for every trial, and heat maps of the final metric over
temperature x width (one per `learn_temperature` value when that axis is searched).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .results import TrialRecord, winner

# A continuous axis with more distinct values than this is binned (log-spaced) for the heat map.
MAX_HEAT_LEVELS = 8
HEAT_BINS = 6


@dataclass
class HeatMap:
    """Final metric per (temperature, width) cell: `values[i, j]` for temps[i], widths[j] (NaN: none)."""

    title: str
    temps: list[str]
    widths: list[str]
    values: np.ndarray
    notes: np.ndarray  # per cell: "" (completed), "ES" (best trial early-stopped), "fail", "n/a"
    best: Optional[tuple[int, int]] = None  # the sweep winner's cell, when it is in this map


def _levels(values: Sequence[float]) -> tuple[list[str], list[int]]:
    """Axis labels and each value's index: distinct values, or log bins when there are many."""
    distinct = sorted(set(values))
    if len(distinct) <= MAX_HEAT_LEVELS:
        return [f"{v:.3g}" for v in distinct], [distinct.index(v) for v in values]
    lo, hi = math.log(min(distinct)), math.log(max(distinct))
    edges = np.linspace(lo, hi, HEAT_BINS + 1)
    index = [min(HEAT_BINS - 1, int(np.searchsorted(edges, math.log(v), side="right") - 1)) for v in values]
    labels = [f"{math.exp(edges[i]):.2g}-{math.exp(edges[i + 1]):.2g}" for i in range(HEAT_BINS)]
    return labels, index


def heat_maps(
    rows: Sequence[dict], metric: str, mode: str, base_temperature: float, base_width: float, base_learn: bool
) -> list[HeatMap]:
    """The heat maps of the final metric; a cell holding several trials shows its best one."""
    if not rows:
        return []
    final_key = f"final_{metric}"
    temps = [float(r["temperature_init"] if r.get("temperature_init") is not None else base_temperature) for r in rows]
    widths = [float(r["width_mult"] if r.get("width_mult") is not None else base_width) for r in rows]
    learn = [bool(r["learn_temperature"]) if r.get("learn_temperature") is not None else base_learn for r in rows]
    t_labels, t_index = _levels(temps)
    w_labels, w_index = _levels(widths)
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    top = winner(rows, metric)
    maps = []
    panels = sorted(set(learn), reverse=True)
    for panel in panels:
        values = np.full((len(t_labels), len(w_labels)), np.nan)
        notes = np.full(values.shape, "n/a", dtype=object)
        rank = np.full(values.shape, 9, dtype=int)  # 0 completed, 1 early-stopped, 2 failed
        best = None
        for row, ti, wi, lt in zip(rows, t_index, w_index, learn):
            if lt != panel:
                continue
            if row is top:
                best = (ti, wi)
            tier = {"completed": 0, "early_stopped": 1}.get(row["status"], 2)
            value = row.get(final_key)
            current = values[ti, wi]
            if tier < rank[ti, wi] or (
                tier == rank[ti, wi] and value is not None and (np.isnan(current) or better(value, current))
            ):
                rank[ti, wi] = tier
                values[ti, wi] = np.nan if value is None else value
                notes[ti, wi] = ("", "ES", "fail")[tier]
        title = f"final {metric}" + (f", learn_temperature={panel}" if len(panels) > 1 else "")
        maps.append(HeatMap(title, t_labels, w_labels, values, notes, best))
    return maps


def _label(values: dict[str, Any]) -> str:
    short = {
        "temperature_init": "T0",
        "learn_temperature": "learnT",
        "width_mult": "w",
        "lr": "lr",
        "batch_size": "bs",
        "seed": "seed",
    }
    parts = []
    for key, value in values.items():
        value = f"{value:.3g}" if isinstance(value, float) else value
        parts.append(f"{short.get(key, key)}={value}")
    return " ".join(parts) or "base"


def plot_sweep(
    records: Sequence[TrialRecord],
    rows: Sequence[dict],
    metric: str,
    mode: str,
    *,
    base_temperature: float,
    base_width: float,
    base_learn: bool,
    title: Optional[str] = None,
) -> bytes:
    """sweep.png as bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = heat_maps(rows, metric, mode, base_temperature, base_width, base_learn)
    ncols = 1 + max(1, len(maps))
    fig = Figure(figsize=(6.5 + 4.8 * (ncols - 1), 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    status = {r["trial_id"]: r["status"] for r in rows}

    ax = axes[0]
    cmap = _colormap(len(records))
    # Legend labels name only the values that differ between trials.
    varying = {k for k in {k for r in records for k in r.values} if len({repr(r.values.get(k)) for r in records}) > 1}
    for i, record in enumerate(records):
        series = record.metric_series(metric)
        if not series:
            continue
        xs, ys = zip(*series)
        st = status.get(record.trial_id, "")
        style = {"completed": "-", "early_stopped": "--"}.get(st, ":")
        shown = {k: v for k, v in record.values.items() if k in varying}
        (line,) = ax.plot(xs, ys, style, color=cmap(i), lw=1.6, label=f"{_label(shown)} ({st.replace('_', ' ')})")
        ax.plot(xs[-1], ys[-1], "x" if st == "early_stopped" else "o", color=line.get_color(), ms=6)
    ax.set_xlabel("samples seen")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over training ({'lower' if mode == 'min' else 'higher'} is better)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no trial reported {metric}", ha="center", va="center", transform=ax.transAxes)

    for ax, hm in zip(axes[1:], maps or [None]):
        if hm is None:
            ax.axis("off")
            continue
        finite = hm.values[np.isfinite(hm.values)]
        cmap_name = "viridis_r" if mode == "min" else "viridis"
        im = ax.imshow(
            np.ma.masked_invalid(hm.values),
            cmap=cmap_name,
            aspect="auto",
            origin="lower",
            vmin=finite.min() if finite.size else None,
            vmax=finite.max() if finite.size else None,
        )
        ax.set_xticks(range(len(hm.widths)), hm.widths)
        ax.set_yticks(range(len(hm.temps)), hm.temps)
        ax.set_xlabel("width_mult")
        ax.set_ylabel("temperature_init")
        ax.set_title(hm.title)
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(hm.values):
            note = hm.notes[i, j]
            text = ("-" if np.isnan(value) else f"{value:.3g}") + (f"\n{note}" if note else "")
            dark = np.isfinite(value) and ((value > mid) if mode == "min" else (value < mid))
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        if hm.best is not None:
            from matplotlib.patches import Rectangle

            i, j = hm.best
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5))
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _colormap(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return lambda i: cmap(i % cmap.N)
