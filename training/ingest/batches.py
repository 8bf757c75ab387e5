"""Exact local batches from a stream of preprocessed rows, and the data position of each batch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from training.ingest.preprocess import KEY_COL, REJECT_REASONS


@dataclass
class DataPosition:
    """Where a worker is in its stream: `rows` rows of its share of pass `pass_index` consumed."""

    pass_index: int = 0
    rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"pass": self.pass_index, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "DataPosition":
        return cls(int(d["pass"]), int(d["rows"]))


@dataclass
class Batch:
    images: Any  # torch uint8 [B, S, S, 3]
    tokens: Any  # torch int32 [B, L]
    position: DataPosition  # just past this batch's last row
    keys: list = field(default_factory=list)
    passes: Any = ()  # torch int32 [B]: each row's pass


class Rebatcher:
    """Cuts a stream of preprocessed row batches into exact `batch_size` batches of usable rows.

    Rows with a nonzero `status` are dropped and counted in `rejected` by reason. Every output
    batch carries the position just past its last row (from the `pass` and `row` columns). Works
    on torch tensors (what iter_torch_batches yields).
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.rejected: Counter = Counter()
        self._parts: list[tuple[Any, Any, list, Any, Any]] = []  # images, tokens, keys, pass, row
        self._buffered = 0

    def add(self, batch: dict[str, Any]) -> list[Batch]:
        import torch

        images, tokens = batch["image"], batch["tokens"]
        status = torch.as_tensor(batch["status"])
        passes, rows = torch.as_tensor(batch["pass"]), torch.as_tensor(batch["row"])
        keys = list(batch.get(KEY_COL, []))
        bad = status != 0
        if bool(bad.any()):
            codes, counts = torch.unique(status[bad], return_counts=True)
            for code, count in zip(codes.tolist(), counts.tolist()):
                self.rejected[REJECT_REASONS[code]] += count
            keep = torch.nonzero(~bad).flatten()
            images, tokens, passes, rows = images[keep], tokens[keep], passes[keep], rows[keep]
            keys = [keys[i] for i in keep.tolist()] if keys else []
        if len(rows) == 0:
            return []
        if not self._parts and len(rows) == self.batch_size:  # the common case: no copy
            return [Batch(images, tokens, DataPosition(int(passes[-1]), int(rows[-1]) + 1), keys, passes)]
        self._parts.append((images, tokens, keys, passes, rows))
        self._buffered += len(rows)
        out = []
        while self._buffered >= self.batch_size:
            out.append(self._take(self.batch_size))
        return out

    def _take(self, n: int) -> Batch:
        import torch

        images, tokens, keys, passes = [], [], [], []
        last = None
        need = n
        while need:
            im, tk, ky, ps, rw = self._parts[0]
            k = min(need, len(rw))
            images.append(im[:k]), tokens.append(tk[:k]), keys.extend(ky[:k]), passes.append(ps[:k])
            last = (int(ps[k - 1]), int(rw[k - 1]) + 1)
            if k == len(rw):
                self._parts.pop(0)
            else:
                self._parts[0] = (im[k:], tk[k:], ky[k:], ps[k:], rw[k:])
            need -= k
        self._buffered -= n
        cat = (lambda xs: xs[0]) if len(images) == 1 else torch.cat
        return Batch(cat(images), cat(tokens), DataPosition(*last), keys, cat(passes))
