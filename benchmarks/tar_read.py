"""CPU per sample of reading WebDataset tars, before any image is decoded: the tar walkers side by
side, and the training ingest's read step on Parquet shards against their WebDataset twin.

Walkers, over one in-memory tar as img2dataset writes it (`webdataset.TarWriter`: jpg, json, txt
per sample, a pax header for each float mtime), every sample's members grouped:

  tarfile        the standard library (`tarfile.open(mode="r|")`, `extractfile`)
  webdataset     the `webdataset` package's `tar_file_expander` + `group_by_keys` (open_clip's path)
  walk_members   `storage.tar_members`, the stream walker (`SampleReader` over a BytesIO)
  walk_buffer    `storage.tar_buffer`, the in-memory walk of a training piece (`SampleReader` over bytes)

Read step (`--shards`, the folder `benchmarks/ingest.py` makes, and its `-wds` twin beside it):
`training.ingest.read.ShardReader.read` over every unit of one pass, preprocessing left out, so the
numbers are what reading, walking and ordering cost per sample on each format.

CPU seconds (`time.process_time`, all threads) per sample, the minimum of --repeats interleaved
runs (the minimum: the least disturbed run of a shared machine).

    python benchmarks/tar_read.py [--samples 4096] [--repeats 7] [--shards /tmp/bench_shards]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def make_tar(samples: int, image_bytes: int = 20_000) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    writer = wds.TarWriter(buf)
    for i in range(samples):
        writer.write(
            {"__key__": f"{i:09d}", "jpg": os.urandom(image_bytes), "txt": f"a caption {i}", "json": b'{"k": 1}'}
        )
    writer.close()
    return buf.getvalue()


def walkers(raw: bytes) -> dict:
    import webdataset as wds

    from storage.webdataset import read_samples

    def with_tarfile():
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
            return sum(1 for info in tar if info.isreg() and tar.extractfile(info).read() is not None)

    def with_webdataset():
        members = wds.tariterators.tar_file_expander([{"stream": io.BytesIO(raw), "url": "mem"}])
        return sum(1 for _ in wds.tariterators.group_by_keys(members))

    return {
        "tarfile": with_tarfile,
        "webdataset": with_webdataset,
        "walk_members": lambda: sum(1 for _ in read_samples(io.BytesIO(raw))),
        "walk_buffer": lambda: sum(1 for _ in read_samples(raw)),
    }


def read_steps(folder: Path) -> dict:
    from training.ingest import PreprocessSettings, list_shards
    from training.ingest.passes import PassPlanner
    from training.ingest.read import ShardReader

    steps = {}
    for label, path in (("read Parquet", folder), ("read tars", folder.parent / (folder.name + "-wds"))):
        fs, shards = list_shards([str(path)])
        units = PassPlanner(shards, seed=0, shuffle_rows=256, num_workers=1).units(0, 0)
        reader = ShardReader(PreprocessSettings(image_size=224), fs, rows_per_batch=64)
        reader.preprocess = lambda columns, pass_index: {"status": [0] * len(columns["key"])}

        def step(reader=reader, units=units):
            return sum(len(out["status"]) for unit in units for out in reader.read(unit))

        step()  # warm: file handles, offsets cache
        steps[label] = step
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shards", help="benchmarks/ingest.py's Parquet folder (its -wds twin beside it)")
    args = parser.parse_args(argv)
    runs = walkers(make_tar(args.samples))
    if args.shards:
        runs.update(read_steps(Path(args.shards)))
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for label, run in runs.items():
            start = time.process_time()
            samples = run()
            per_sample = (time.process_time() - start) / samples * 1e6
            best[label] = min(best.get(label, per_sample), per_sample)
    load = os.getloadavg()[0]
    print(f"{args.samples} samples (20 kB images), CPU us per sample, min of {args.repeats}, load {load:.1f}")
    for label, us in best.items():
        print(f"  {label:14s} {us:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
