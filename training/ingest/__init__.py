"""Training ingest: pipeline shards -> ready uint8 image batches and token ids on each Train worker.

- `plan`: find the shards, order a pass, deal it to workers, cut it into read units (pure).
- `mixture`: weighted sources of `train.data`: which shards (repeated or subsampled) make a pass.
- `webdataset`: WebDataset tar shards' sample counts (cached) and rows.
- `preprocess`: decode -> square crop -> resize -> tokenize one batch of rows (pure).
- `read`: `ShardReader`, the preprocessing actors' function: read units -> preprocessed rows.
- `batches`: exact local batches and the data position of each (pure).
- `stream`: the Ray Data wiring, one Dataset per worker (`ShardStream`, `eval_dataset`).

Data position and passes (docs/training.md): pass p orders the shard files by a permutation seeded
with (train.seed, p) and deals them to workers, rows balanced. Each worker reads its files of pass
p in order, in windows of `train.shuffle_rows` rows whose rows are permuted by a seeded generator,
so its stream is deterministic, and its position is (pass, rows of its stream of that pass already
consumed). A checkpoint stores every worker's position; a resumed run starts right after it: no
sample of the current pass is replayed or skipped. Crops are seeded by (train.seed, pass, key): a
resumed run sees the same crops as an uninterrupted one.
"""

from training.ingest.batches import Batch, DataPosition, Rebatcher
from training.ingest.mixture import list_training_shards, mix_pass
from training.ingest.plan import Shard, list_shards, pass_units, plan_fingerprint, plan_pass, split_rows
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
    "pass_units",
    "plan_fingerprint",
    "plan_pass",
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
