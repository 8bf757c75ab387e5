"""The pipeline's WebDataset output (`data.output_format: webdataset`): img2dataset's layout, read
back with the `webdataset` package the way open_clip reads it, rejects and manifest unchanged, and
the training ingest reads the shards (Parquet URL list in -> WebDataset out -> training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.run import run_pipeline
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes, png_bytes


@pytest.mark.slow
def test_webdataset_output_opens_with_the_webdataset_package_and_feeds_training(ray_local, tmp_path):
    import webdataset as wds

    routes = {f"/{i}.jpg": jpeg_bytes(60 + i, 50, seed=i) for i in range(9)}
    routes["/p.png"] = png_bytes(40, 40, seed=3, mode="RGB")
    routes["/gone.jpg"] = Route(status=404)
    with HTTPTestServer(routes) as server:
        paths = [f"/{i}.jpg" for i in range(9)] + ["/p.png", "/gone.jpg"]
        captions = [f"picture number {i}" for i in range(len(paths))]
        captions[4] = ""  # rejected by the caption filter
        pq.write_table(
            pa.table({"url": [server.url(p) for p in paths], "caption": captions, "score": list(range(len(paths)))}),
            tmp_path / "list.parquet",
        )
        data = DataConfig(
            input=str(tmp_path / "list.parquet"),
            output=str(tmp_path / "out"),
            output_format="webdataset",
            extra_cols=["score"],
            allow_private_addresses=True,
            timeout_s=2.0,
            retries=0,
            num_download_actors=1,
            threads_per_actor=2,
            rows_per_shard=4,
            image_size=32,
            progress=False,
        )
        manifest = run_pipeline(data)
    out = tmp_path / "out"
    assert manifest["accepted"] + manifest["rejected"] == manifest["input_rows"] == len(paths)
    assert manifest["reasons"] == {"http_404": 1, "caption_empty": 1}
    tars = sorted((out / "shards").glob("*.tar"))
    assert [f"shards/{t.name}" for t in tars] == [s["path"] for s in manifest["shards"]]
    for tar in tars:  # img2dataset's stats file beside each tar: successes = samples in it
        stats = json.loads((out / "shards" / (tar.stem + "_stats.json")).read_text())
        entry = next(s for s in manifest["shards"] if s["path"].endswith(tar.name))
        assert stats["successes"] == entry["rows"] and stats["count"] == min(4, len(paths) - 4 * int(tar.stem))
    rejects = pq.read_table(sorted((out / "rejects").glob("*.parquet"))).to_pylist()
    assert sorted(r["reason"] for r in rejects) == ["caption_empty", "http_404"]

    # open_clip's reader: wds.WebDataset(urls).decode("pil").to_tuple("jpg;png;jpeg;webp", "txt")
    urls = [str(t) for t in tars]
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;jpeg;webp", "txt", "json"))
    assert len(pairs) == manifest["accepted"] == 9
    kept = [i for i in range(len(paths)) if i not in (4, 10)]
    assert [caption for _, caption, _ in pairs] == [captions[i] for i in kept]
    assert [meta["score"] for _, _, meta in pairs] == kept  # extra columns in the json
    assert all(image.size == (32, 32) and image.mode == "RGB" for image, _, _ in pairs)

    # The training ingest reads the same shards: every sample usable, in shard order.
    from training.ingest import PreprocessSettings, ShardReader, list_shards, pass_units

    _, shards = list_shards([str(out / "shards")], count_cache=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # counts from the _stats.json files
    reader = ShardReader(PreprocessSettings(image_size=16, context_length=8))
    parts = [p for u in pass_units(shards, 0) for p in reader.read(u)]
    assert np.concatenate([p["status"] for p in parts]).tolist() == [0] * 9
    assert [k for p in parts for k in p["key"]] == [meta["key"] for _, _, meta in pairs]

    # ... and `clipray train`'s runner trains on them (Parquet in -> WebDataset out -> training).
    from training.config import ModelConfig, TrainConfig
    from training.driver import run_training

    train = TrainConfig(
        data=[str(out / "shards")],
        storage_path=str(tmp_path / "runs"),
        name="on-tars",
        num_workers=1,
        batch_size=4,
        samples=4 * 3,
        warmup=1,
        checkpoint_every=3,
        num_preprocess_actors=1,
        preprocess_cpus=0.5,
    )
    run_training(ModelConfig(name="ViT-Tiny", width_mult=0.5), train)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "on-tars" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["samples_seen"] == 12
    assert (tmp_path / "runs" / "on-tars" / "final" / "model.safetensors").is_file()


def test_webdataset_output_refuses_retry_rejects_with_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="retry_rejects cannot be combined with data.output_format: webdataset"):
        DataConfig(input="x.parquet", output=str(tmp_path), output_format="webdataset", retry_rejects=True)


@pytest.mark.slow
def test_webdataset_input_is_refiltered_deduplicated_and_resharded_without_any_download(ray_local, tmp_path):
    """WebDataset in -> filters and dedup -> WebDataset out: the images come from the tars (their URLs
    point at a closed loopback port, and private addresses are refused), every sample is accounted for."""
    import io
    import tarfile

    import webdataset as wds

    from tests.support.train_shards import write_webdataset_shards

    tars = write_webdataset_shards(tmp_path / "in", copies=1, rows_per_shard=30, side=48)
    for tar in tars[2:]:  # two shards are enough
        tar.unlink()
        (tmp_path / "in" / (tar.stem + "_stats.json")).unlink()
    tars = tars[:2]
    first = tarfile.open(tars[0])
    names = first.getnames()  # per sample: .jpg, .json, .txt
    image = first.extractfile(names[3]).read()  # sample 1's jpg (its caption has 7 words)
    with tarfile.open(tmp_path / "in" / "99999.tar", "w") as extra:  # a copy, a sample without image
        for name, body in (
            ("copy.jpg", image),
            ("copy.txt", b"the same picture again"),
            ("noimage.txt", b"only words"),
            ("noimage.json", b'{"url": "http://127.0.0.1:9/x.jpg"}'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            extra.addfile(info, io.BytesIO(body))
    total = sum(len({n.split(".")[0] for n in tarfile.open(t).getnames()}) for t in tars) + 2
    data = DataConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        output_format="webdataset",
        num_download_actors=1,
        threads_per_actor=2,
        rows_per_shard=64,
        image_size=48,
        resize_mode="no",
        progress=False,
        filters={"dedup_sha256": True, "min_caption_words": 4},
    )
    manifest = run_pipeline(data)
    assert manifest["input_rows"] == total and manifest["accepted"] + manifest["rejected"] == total
    reasons = manifest["reasons"]
    assert reasons["duplicate"] >= 1 and reasons["malformed_row"] == 1
    assert not {"blocked_address", "connection_error", "timeout", "invalid_url"} & set(reasons)
    urls = [str(p) for p in sorted((tmp_path / "out" / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;jpeg;webp", "txt"))
    assert len(samples) == manifest["accepted"] > 0
    assert all(len(caption.split()) >= 4 for _, caption in samples)
    assert "the same picture again" not in [c for _, c in samples]  # the later copy is the duplicate
    assert first.extractfile(names[5]).read().decode() in [c for _, c in samples]  # sample 1 is kept


def test_an_output_folder_planned_before_output_format_existed_still_resumes(tmp_path: Path):
    from pipeline.resume import fingerprint, fingerprint_changes

    data = DataConfig(input="x.parquet", output=str(tmp_path))
    older = fingerprint(data)  # as a plan written before output_format, local_root, filters.columns
    for gone in ("output_format", "local_root"):
        older.pop(gone, None)
    older["filters"].pop("columns", None)
    assert fingerprint_changes(older, fingerprint(data)) == []
    changed = fingerprint_changes(older, fingerprint(data.model_copy(update={"output_format": "webdataset"})))
    assert changed == ["data.output_format: None -> 'webdataset'"]
