"""Training ingest throughput: Parquet or WebDataset shards -> ready uint8 batches, images/s per CPU core.

Five measurements over the same images (256 px JPEGs), as Parquet shards (pipeline layout) and as
their WebDataset twin (img2dataset's tars, one per Parquet shard, written with `webdataset.TarWriter`),
all doing the same work per image (`training.ingest.Preprocess`: decode, random square crop, resize
to 224, tokenize):

  ceiling     one process, decode + crop + resize only, no batching (the issue's reference)
  dataloader  a plain torch DataLoader: an IterableDataset reading row groups with pyarrow,
              `num_workers` = cores, batches of --batch
  ray         clipray's training stream (`training.ingest.ShardStream`): Ray Data, one preprocessing
              actor per core, exact batches of --batch handed to the consumer
  wds-loader  open_clip's loader on the tars: a `webdataset` DataPipeline (shard list, split by
              worker, tarfile_to_samples, to_tuple, the same Preprocess) in a torch DataLoader
  ray-wds     clipray's training stream on the tars, each read in pieces of 128 samples (their
              offsets indexed by the preprocessing actors and cached), like the Parquet row groups

Reports images/s per core and the ratios (ray / dataloader, target >= 1.0; ray / (0.8 x ceiling x
cores), target >= 1.0; ray-wds / ray and ray-wds / wds-loader, targets >= 1.0), both steady (from the first batch on: what a long training run sees) and
over the whole run (with the start-up: worker processes, imports, tokenizer). Every number is the
median of --repeats runs of --passes passes; the machine may be shared, so runs interleave.

    python benchmarks/ingest.py [--images 4096] [--passes 3] [--batch 256] [--decoder cv2|pil] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

IMAGE_SIDE = 256
TARGET = 224


def make_shards(folder: Path, images: int, rows_per_shard: int = 512) -> None:
    """Pipeline-layout shards of 256 px JPEGs (the demo's drawn shapes on noisy backgrounds)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.demo_data import draw_image, encode_jpeg, make_samples

    samples = (make_samples("bench", max(1, images // 300 + 1), 0))[:images]
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), rows_per_shard):
        part = samples[start : start + rows_per_shard]
        blobs = [encode_jpeg(draw_image(s, IMAGE_SIDE), quality=90) for s in part]
        pq.write_table(
            pa.table(
                {
                    "key": [s.key for s in part],
                    "url": [""] * len(part),
                    "caption": [s.caption for s in part],
                    "jpg": pa.array(blobs, pa.binary()),
                    "width": [IMAGE_SIDE] * len(part),
                    "height": [IMAGE_SIDE] * len(part),
                    "original_width": [IMAGE_SIDE] * len(part),
                    "original_height": [IMAGE_SIDE] * len(part),
                    "sha256": [hashlib.sha256(b).hexdigest() for b in blobs],
                }
            ),
            folder / f"{start // rows_per_shard:05d}.parquet",
            row_group_size=128,
        )


def make_webdataset_twin(shards, folder: Path) -> None:
    """The Parquet shards' rows as img2dataset's WebDataset output: `{n}.tar` ({key}.jpg, .txt,
    .json through `webdataset.TarWriter`) and `{n}_stats.json`, one tar per Parquet shard."""
    import json

    import pyarrow.parquet as pq
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for n, shard in enumerate(shards):
        table = pq.read_table(shard.path, columns=["key", "caption", "jpg"])
        with open(folder / f"{n:05d}.tar", "wb") as fh:
            writer = wds.TarWriter(fh)
            for key, caption, jpg in zip(*(table.column(c).to_pylist() for c in ("key", "caption", "jpg"))):
                writer.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps({"key": key})})
            writer.close()
        (folder / f"{n:05d}_stats.json").write_text(json.dumps({"successes": table.num_rows}))


def ceiling(shards, decoder: str) -> float:
    """images/s of decode + random crop + resize in this process (no tokenizing, no batching)."""
    import pyarrow.parquet as pq

    from training.ingest import Preprocess, PreprocessSettings

    pre = Preprocess(PreprocessSettings(image_size=TARGET, decoder=decoder))
    blobs, keys = [], []
    for shard in shards:
        table = pq.read_table(shard.path, columns=["key", "jpg"])
        blobs += table.column("jpg").to_pylist()
        keys += table.column("key").to_pylist()
    out = np.zeros((TARGET, TARGET, 3), np.uint8)
    t0 = time.perf_counter()
    for blob, key in zip(blobs, keys):
        if pre._image(blob, key, out, 0):
            raise RuntimeError(f"{key}: did not decode")
    return len(blobs) / (time.perf_counter() - t0)


class ShardRows(torch.utils.data.IterableDataset):
    """This DataLoader worker's row groups, preprocessed like clipray's."""

    def __init__(self, shards, decoder: str, passes: int = 1, rows_per_batch: int = 64):
        self.shards, self.decoder, self.passes, self.rows_per_batch = shards, decoder, passes, rows_per_batch

    def __iter__(self):
        import pyarrow.parquet as pq

        from training.ingest import REQUIRED_COLUMNS, Preprocess, PreprocessSettings

        info = torch.utils.data.get_worker_info()
        wid, nworkers = (0, 1) if info is None else (info.id, info.num_workers)
        pre = Preprocess(PreprocessSettings(image_size=TARGET, decoder=self.decoder))
        pieces = [(s.path, g) for _ in range(self.passes) for s in self.shards for g in range(len(s.groups))]
        for path, group in pieces[wid::nworkers]:
            table = pq.ParquetFile(path).read_row_group(group, columns=list(REQUIRED_COLUMNS))
            for start in range(0, table.num_rows, self.rows_per_batch):
                part = table.slice(start, self.rows_per_batch)
                out = pre({c: part.column(c).to_numpy(zero_copy_only=False) for c in REQUIRED_COLUMNS})
                for i in range(part.num_rows):
                    yield torch.from_numpy(out["image"][i]), torch.from_numpy(out["tokens"][i])


def _timed(batches) -> tuple[float, float, float]:
    """(steady images/s after the first batch, images/s over the whole run, seconds to the first
    batch) of an iterable of batch sizes."""
    n, t0, first = 0, time.perf_counter(), None
    for size in batches:
        if first is None:
            first, n_first = time.perf_counter() - t0, size
        n += size
    total = time.perf_counter() - t0
    return (n - n_first) / max(total - first, 1e-9), n / total, first


def dataloader(shards, decoder: str, batch: int, workers: int, passes: int) -> tuple[float, float]:
    loader = torch.utils.data.DataLoader(
        ShardRows(shards, decoder, passes),
        batch_size=batch,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4,
    )

    def sizes():
        for images, _tokens in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (TARGET, TARGET, 3)
            yield images.shape[0]

    return _timed(sizes())


def wds_loader(tars: list[str], decoder: str, batch: int, workers: int, passes: int) -> tuple[float, float, float]:
    """open_clip's WebDataset loader (its `get_wds_dataset` without resampling/shuffle buffers), doing
    our Preprocess per row instead of torchvision's transform, in a torch DataLoader."""
    import webdataset as wds

    from training.ingest import Preprocess, PreprocessSettings

    def preprocess(rows):
        pre = Preprocess(PreprocessSettings(image_size=TARGET, decoder=decoder))
        chunk: list = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == 64:
                yield from _preprocessed(pre, chunk)
                chunk = []
        if chunk:
            yield from _preprocessed(pre, chunk)

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(tars * passes),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.to_tuple("__key__", "jpg;png;jpeg;webp", "txt"),
        preprocess,
        wds.batched(batch, partial=True),
    )
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, prefetch_factor=4)

    def sizes():
        for images, _tokens in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (TARGET, TARGET, 3)
            yield images.shape[0]

    return _timed(sizes())


def _preprocessed(pre, chunk):
    keys, blobs, captions = zip(*chunk)
    out = pre({"key": np.asarray(keys, dtype=object), "jpg": list(blobs), "caption": list(captions)})
    for i in range(len(keys)):
        yield torch.from_numpy(out["image"][i]), torch.from_numpy(out["tokens"][i])


def ray_stream(shards, fs, decoder: str, batch: int, actors: int, passes: int) -> tuple[float, float]:
    from training.ingest import DataPosition, PreprocessSettings, ShardStream, StreamSettings

    settings = StreamSettings(
        local_batch=batch,
        preprocess=PreprocessSettings(image_size=TARGET, decoder=decoder),
        num_actors=actors,
        cpus_per_actor=1.0,
        rows_per_batch=64,
        prefetch_batches=4,
        data_cpus=float(actors),
        shuffle_rows=256,
    )
    stream = ShardStream(
        shards, fs, rank=0, world_size=1, seed=0, start=DataPosition(0, 0), settings=settings, max_passes=passes
    )

    def sizes():
        for b in stream:
            assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (TARGET, TARGET, 3)
            yield b.images.shape[0]

    return _timed(sizes())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--decoder", default="cv2", choices=["cv2", "pil"])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3, help="passes over the shards per run (start-up amortised)")
    parser.add_argument("--shards", help="shard folder to use (made there first if missing; default: a temp folder)")
    args = parser.parse_args(argv)

    import ray

    from training.ingest import list_shards

    with tempfile.TemporaryDirectory(prefix="clipray-ingest-") as tmp:
        folder = Path(args.shards) if args.shards else Path(tmp) / "shards"
        if not folder.exists():
            make_shards(folder, args.images)
        fs, shards = list_shards([str(folder)])
        total = sum(s.rows for s in shards)
        tar_folder = folder.parent / (folder.name + "-wds")
        if not tar_folder.exists():
            make_webdataset_twin(shards, tar_folder)
        tar_fs, tar_shards = list_shards([str(tar_folder)])
        tars = [s.path for s in tar_shards]
        ray.init(
            num_cpus=args.cores + 1,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}},
        )
        try:
            ray_stream(shards, fs, args.decoder, args.batch, args.cores, 1)  # warm: worker processes, imports
            runs: dict[str, list] = {k: [] for k in ("ceiling", "dataloader", "ray", "wds-loader", "ray-wds")}
            for _ in range(args.repeats):
                one = ceiling(shards, args.decoder)
                runs["ceiling"].append((one, one, 0.0))
                runs["dataloader"].append(dataloader(shards, args.decoder, args.batch, args.cores, args.passes))
                runs["ray"].append(ray_stream(shards, fs, args.decoder, args.batch, args.cores, args.passes))
                runs["wds-loader"].append(wds_loader(tars, args.decoder, args.batch, args.cores, args.passes))
                runs["ray-wds"].append(
                    ray_stream(tar_shards, tar_fs, args.decoder, args.batch, args.cores, args.passes)
                )
        finally:
            ray.shutdown()
    steady = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    whole = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{total} images x {args.passes} passes, {IMAGE_SIDE} px -> {TARGET} px uint8, decoder {args.decoder}, "
        f"{args.cores} cores, batch {args.batch}, median of {args.repeats}, load average {load:.1f} "
        f"({platform.processor() or platform.machine()})"
    )
    print("  images/s [per core]   steady (after the 1st batch)   whole run   runs: steady/whole/s to 1st batch")
    for k in ("ceiling", "dataloader", "ray", "wds-loader", "ray-wds"):
        cores = 1 if k == "ceiling" else args.cores
        print(
            f"  {k:10s}            {steady[k]:7.0f} [{steady[k] / cores:6.0f}]            "
            f"{whole[k]:7.0f} [{whole[k] / cores:6.0f}]   "
            + ", ".join(f"{a:.0f}/{b:.0f}/{c:.1f}" for a, b, c in runs[k])
        )
    for label, m in (("steady", steady), ("whole run", whole)):
        print(
            f"  {label:9s}: ray / dataloader = {m['ray'] / m['dataloader']:.2f}x (target >= 1.0), "
            f"ray / (0.8 x ceiling x cores) = {m['ray'] / (0.8 * m['ceiling'] * args.cores):.2f} (target >= 1.0)"
        )
        print(
            f"  {label:9s}: ray-wds / ray (Parquet) = {m['ray-wds'] / m['ray']:.2f}x, "
            f"ray-wds / wds-loader (open_clip) = {m['ray-wds'] / m['wds-loader']:.2f}x (targets >= 1.0)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
