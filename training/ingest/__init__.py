"""Training ingest: pipeline shards -> ready uint8 image batches and token ids on each Train worker.

- `plan`: find the shards and read their footers (pure).
- `mixture`: weighted sources of `train.data`: which shards (repeated or subsampled) make a pass.
- `passes`: a pass as one sequence of shuffle windows, dealt to any number of workers; what of it
  has been consumed; read units (pure).
- `webdataset`: WebDataset tar shards' sample counts (cached) and rows.
- `preprocess`: decode -> square crop -> resize -> tokenize one batch of rows (pure).
- `read`: `ShardReader`, the preprocessing actors' function: read units -> preprocessed rows.
- `batches`: exact local batches and the data position of each (pure).
- `stream`: the Ray Data wiring, one Dataset per worker (`ShardStream`, `eval_dataset`).

Data position and passes (docs/training.md): pass p orders the shards by a permutation seeded with
(train.seed, p) and cuts their row groups into windows of `train.shuffle_rows` rows, each read in a
seeded permuted order; the windows are dealt to the workers, rows balanced. A worker's position is
(pass, rows of its share consumed); a checkpoint stores every worker's position, which converts to
what of the pass has been consumed whatever the number of workers, so a resumed run, of the same
size or another, starts right after it: no sample of the current pass is replayed or skipped. Crops
are seeded by (train.seed, pass, key): a resumed run sees the same crops as an uninterrupted one.
"""

from training.ingest.batches import Batch, DataPosition, Rebatcher
from training.ingest.mixture import list_training_shards, mix_pass
from training.ingest.passes import PassPlanner, PassState, Window, pass_units, pass_windows, resize, split_rows
from training.ingest.plan import Shard, list_shards, plan_fingerprint
from training.ingest.preprocess import (
    CAPTION_COL,
    IMAGE_COL,
    KEY_COL,
    REJECT_REASONS,
    REQUIRED_COLUMNS,
    Preprocess,
    PreprocessSettings,
    crop_box,
)
from training.ingest.read import ShardReader
from training.ingest.stream import ShardStream, StreamSettings, eval_dataset, iter_eval_batches

__all__ = [
    "Batch",
    "DataPosition",
    "Rebatcher",
    "Shard",
    "list_shards",
    "list_training_shards",
    "mix_pass",
    "PassPlanner",
    "PassState",
    "Window",
    "pass_units",
    "pass_windows",
    "plan_fingerprint",
    "resize",
    "split_rows",
    "CAPTION_COL",
    "IMAGE_COL",
    "KEY_COL",
    "REJECT_REASONS",
    "REQUIRED_COLUMNS",
    "Preprocess",
    "PreprocessSettings",
    "crop_box",
    "ShardReader",
    "ShardStream",
    "StreamSettings",
    "eval_dataset",
    "iter_eval_batches",
]
