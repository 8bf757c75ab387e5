"""`ShardReader`, the preprocessing actors' function: read units -> preprocessed rows, in order."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Optional

import numpy as np

from storage.webdataset import is_tar
from training.ingest.preprocess import REJECT_REASONS, REQUIRED_COLUMNS, Preprocess, PreprocessSettings
from training.ingest.webdataset import TarPieceReader

_COLUMN_TYPES = {"key": "string", "caption": "string", "jpg": "binary"}


class ShardReader:
    """The map_batches UDF: read units -> preprocessed rows, in stream order.

    Reads a unit's row groups with pyarrow (only the needed columns; a WebDataset tar's row groups
    are its pieces, read by `TarPieceReader` with the offsets cached under `count_cache`, whose
    problem codes become the rows' status), puts them in the unit's order (for training windows a
    permutation seeded with (seed, pass, `perm`)), drops `skip` rows before decoding, keeps `take`,
    runs `Preprocess` on batches of `rows_per_batch` and adds `pass` and `row` (each row's index in
    its worker's pass stream, from the unit's `row`) for the data position.
    """

    def __init__(
        self,
        settings: PreprocessSettings,
        filesystem: Any = None,
        rows_per_batch: int = 64,
        count_cache: Optional[str] = None,
    ):
        self.preprocess = Preprocess(settings)
        self.filesystem = filesystem
        self.rows_per_batch = rows_per_batch
        self._files: OrderedDict = OrderedDict()
        self._tars = TarPieceReader(filesystem, count_cache)

    def _file(self, path: str):
        import pyarrow.parquet as pq

        if path not in self._files:
            handle = self.filesystem.open_input_file(path) if self.filesystem is not None else path
            self._files[path] = pq.ParquetFile(handle)
            while len(self._files) > 8:
                self._files.popitem(last=False)
        self._files.move_to_end(path)
        return self._files[path]

    def read(self, unit: dict) -> Iterator[dict[str, np.ndarray]]:
        """Preprocessed batches of one unit."""
        import json

        import pyarrow as pa

        pieces = json.loads(unit["pieces"]) if isinstance(unit["pieces"], str) else unit["pieces"]
        parts, problems = [], []
        for path, group, rows in pieces:
            if is_tar(path):
                columns = self._tars.rows(path, int(group), int(rows))
                problems.extend(columns.pop("problem"))
                parts.append({name: _objects(columns[name]) for name in REQUIRED_COLUMNS})
            else:
                part = self._file(path).read_row_group(int(group), columns=list(REQUIRED_COLUMNS))
                part = part.cast(pa.schema([(name, _COLUMN_TYPES[name]) for name in part.column_names]))
                parts.append({name: part.column(name).to_numpy(zero_copy_only=False) for name in REQUIRED_COLUMNS})
                problems.extend([None] * part.num_rows)
        table = {name: np.concatenate([part[name] for part in parts]) for name in REQUIRED_COLUMNS}
        num_rows = len(problems)
        first, skip, take = int(unit["row"]), int(unit["skip"]), int(unit["take"])
        pass_index = int(unit["pass"])
        if bool(unit["shuffle"]):
            key = [int(unit["seed"]), pass_index, int(unit["perm"])]
            order = np.random.default_rng(key).permutation(num_rows)
        else:
            order = np.arange(num_rows)
        order = order[skip : skip + take]
        for start in range(0, len(order), self.rows_per_batch):
            chosen = order[start : start + self.rows_per_batch]
            out = self.preprocess({name: column[chosen] for name, column in table.items()}, pass_index)
            for i, j in enumerate(chosen):
                if problems[j] is not None:
                    out["status"][i] = REJECT_REASONS.index(problems[j])
            k = len(chosen)
            out["pass"] = np.full(k, pass_index, dtype=np.int32)
            out["row"] = np.arange(first + start, first + start + k, dtype=np.int64)
            yield out

    def __call__(self, units: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(units["pieces"])):
            yield from self.read({k: v[i] for k, v in units.items()})


def _objects(values: list) -> np.ndarray:
    """A 1-d object array of `values` (bytes, str or None)."""
    return np.fromiter(values, dtype=object, count=len(values))
