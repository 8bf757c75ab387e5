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


def test_webdataset_output_refuses_retry_rejects_with_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="retry_rejects cannot be combined with data.output_format: webdataset"):
        DataConfig(input="x.parquet", output=str(tmp_path), output_format="webdataset", retry_rejects=True)
