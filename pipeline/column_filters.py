"""`data.filters.columns`: rules over the input's own columns (DataComp's
`clip_l14_similarity_score`, LAION's `similarity`, `NSFW`, `pwatermark`, ...), decided from the
input alone, before anything is downloaded.

A rule is `{column, op, value}` (op one of >=, <=, ==, !=, in, not_in) or `{column, top_fraction}`
(keep the best fraction of the whole input by that column: the rows whose value is at least the
cut `filters.clip_score_cut` computes, ties kept). A row a rule rejects is `filter/column:<name>`,
the first failing rule in config order naming it; a row without a value (null, or not comparable)
fails every rule on its column.

A top-fraction cut needs the whole input: `compute_cuts` reads the rule's column from every staged
shard (the copy `normal_form` stages as `column_copy(name)`), over the rows that are readable and
hold a value, once per run; the cuts are committed in `_state/column_cuts.json`, so a resumed run
applies the same ones. `ColumnFilters` then applies the rules row by row (`eligibility.py`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline.config import ColumnRule, DataConfig, column_copy
from pipeline.filters import clip_score_cut
from pipeline.reasons import FILTER, Rejection, column_reason
from storage import Folder

COLUMN_CUTS = "_state/column_cuts.json"


def _numbers(values: Sequence[Any]) -> np.ndarray:
    """float64 of each value; NaN where there is none or it is not a number."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass  # None, or text that is not a number
    return out


def compute_cuts(data: DataConfig, out: Folder, inputs: Sequence[str]) -> dict[str, float]:
    """{rule index: cut} of the top-fraction rules, committed in COLUMN_CUTS (read back when present)."""
    rules = [(i, r) for i, r in enumerate(data.filters.columns) if r.top_fraction is not None]
    if not rules:
        return {}
    if out.exists(COLUMN_CUTS):
        return {k: float(v) for k, v in out.read_json(COLUMN_CUTS).items()}
    wanted = sorted({column_copy(r.column) for _, r in rules})

    def read(name: str) -> pa.Table:
        table = out.read_arrow(name)
        readable = table.column("source_error").is_null()
        return table.select(wanted).filter(readable)

    with ThreadPoolExecutor(16) as pool:
        tables = list(pool.map(read, inputs))
    cuts = {}
    for i, rule in rules:
        values = _numbers([v for t in tables for v in t.column(column_copy(rule.column)).to_pylist()])
        cuts[str(i)] = clip_score_cut(values[~np.isnan(values)], None, rule.top_fraction)
    out.write_json(COLUMN_CUTS, cuts)  # the commit of the cuts
    return {k: float(v) for k, v in cuts.items()}


def load_cuts(out: Folder) -> dict[str, float]:
    return {k: float(v) for k, v in out.read_json(COLUMN_CUTS).items()} if out.exists(COLUMN_CUTS) else {}


class ColumnFilters:
    """The column rules of `data.filters.columns`, with the committed top-fraction cuts."""

    def __init__(self, rules: Sequence[ColumnRule], cuts: Optional[dict[str, float]] = None):
        self.rules = list(rules)
        self.cuts = cuts or {}
        missing = [r.column for i, r in enumerate(self.rules) if r.top_fraction is not None and str(i) not in self.cuts]
        if missing:
            raise RuntimeError(f"no committed top_fraction cut for data.filters.columns on {missing} ({COLUMN_CUTS})")

    def rejections(self, table: pa.Table) -> list[Optional[Rejection]]:
        """One entry per row of a staged input table: the first rule it fails, or None."""
        out: list[Optional[Rejection]] = [None] * table.num_rows
        for i, rule in enumerate(self.rules):
            values = table.column(column_copy(rule.column)).to_pylist()
            for row, value in enumerate(values):
                if out[row] is None:
                    why = self._fails(i, rule, value)
                    if why is not None:
                        out[row] = Rejection(FILTER, column_reason(rule.column), why)
        return out

    def _fails(self, index: int, rule: ColumnRule, value: Any) -> Optional[str]:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{rule.column} has no value"
        if rule.top_fraction is not None:
            cut = self.cuts[str(index)]
            number = _numbers([value])[0]
            if np.isnan(number) or not number >= cut:
                return f"{rule.column} = {value!r} < {cut:.6g} (the top {rule.top_fraction:g} of the input)"
            return None
        return _compare(rule, value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _compare(rule: ColumnRule, value: Any) -> Optional[str]:
    """Why `value` fails `rule` ({column, op, value}), or None. A rule with a number compares the
    input's value as a number (csv/tsv values arrive as text)."""
    target, op = rule.value, rule.op
    numeric = _is_number(target) or (op in ("in", "not_in") and all(_is_number(t) for t in target))
    if numeric:
        number = _numbers([value])[0]
        if np.isnan(number):
            return f"{rule.column} = {value!r} is not a number"
        value = number
    if op == ">=":
        ok = value >= target
    elif op == "<=":
        ok = value <= target
    elif op == "==":
        ok = value == target
    elif op == "!=":
        ok = value != target
    elif op == "in":
        ok = value in target
    else:
        ok = value not in target
    return None if ok else f"{rule.column} = {value!r} is not {op} {target!r}"
