"""Filters over a whole pool, end to end on Ray: the CLIP-score filter keeps the top fraction, and a
DataComp-style pool has its hashes verified and its faces blurred."""

from __future__ import annotations

import pytest

import pyarrow.parquet as pq
import torch

from pipeline.run import run_pipeline
from tests.support.http_server import HTTPTestServer, jpeg_bytes
from tests.test_pipeline_run import config, read_table, write_tsv
from training.model import create_model, save_model

pytestmark = pytest.mark.slow


def test_clip_score_filter_keeps_the_top_fraction(ray_local, tmp_path):
    cfg = {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    save_model(create_model(cfg), tmp_path / "model")
    with HTTPTestServer({f"/{i}.jpg": jpeg_bytes(48, 48, seed=100 + i) for i in range(10)}) as server:
        rows = [(server.url(f"/{i}.jpg").encode(), f"picture number {i}".encode(), None) for i in range(10)]
        write_tsv(tmp_path / "list.tsv", rows)
        data = config(
            tmp_path,
            tmp_path / "list.tsv",
            rows_per_shard=5,
            num_download_actors=1,
            filters={"clip_score": {"model": str(tmp_path / "model"), "top_fraction": 0.3}},
        )
        manifest = run_pipeline(data)
    assert (manifest["accepted"], manifest["reasons"]) == (3, {"clip_score": 7})
    rejects = read_table(tmp_path / "out" / "rejects")
    assert set(rejects.column("stage").to_pylist()) == {"filter"}
    assert "top 30% of 10 scored rows" in rejects.column("detail")[0].as_py()

    # The kept rows are the 3 best by the same model's scores.
    from pipeline.clip_score import ClipScorer

    shards = read_table(tmp_path / "out" / "shards")
    everything = [r for r in rows]
    scorer = ClipScorer(str(tmp_path / "model"))
    jpgs = {k: v for k, v in zip(shards.column("key").to_pylist(), shards.column("jpg").to_pylist())}
    assert len(jpgs) == 3 and len(everything) == 10
    kept_scores = scorer.scores(list(jpgs.values()), shards.column("caption").to_pylist())
    rejected_details = rejects.column("detail").to_pylist()
    worst_kept = float(min(kept_scores))
    for detail in rejected_details:
        assert float(detail.split()[2]) < worst_kept + 1e-4


def test_a_datacomp_style_pool_verifies_hashes_and_blurs_faces(ray_local, tmp_path):
    """configs/datacomp.yaml's checks end to end: the pool's sha256 of the original image, and its
    face boxes blurred in the stored image."""
    import hashlib

    import pyarrow as pa

    from pipeline.download import image_processor

    images = [jpeg_bytes(80, 60, seed=i) for i in range(3)]
    boxes = [[[0.0, 0.0, 0.5, 0.5]], None, []]
    with HTTPTestServer({f"/{i}.jpg": images[i] for i in range(3)}) as server:
        pq.write_table(
            pa.table(
                {
                    "uid": ["a", "b", "c"],
                    "url": [server.url(f"/{i}.jpg") for i in range(3)],
                    "text": ["x", "y", "z"],
                    "sha256": [
                        hashlib.sha256(images[0]).hexdigest(),
                        hashlib.sha256(images[0]).hexdigest(),
                        hashlib.sha256(images[2]).hexdigest().upper(),
                    ],
                    "face_bboxes": boxes,
                }
            ),
            tmp_path / "pool.parquet",
        )
        data = config(
            tmp_path,
            tmp_path / "pool.parquet",
            caption_col="text",
            extra_cols=["uid"],
            verify_hash={"column": "sha256", "algorithm": "sha256"},
            bbox_col="face_bboxes",
        )
        manifest = run_pipeline(data)
    assert (manifest["accepted"], manifest["reasons"]) == (2, {"hash_mismatch": 1})
    kept = read_table(tmp_path / "out" / "shards")
    assert kept.column("uid").to_pylist() == ["a", "c"]
    assert kept.column("sha256").to_pylist() == [hashlib.sha256(j).hexdigest() for j in kept.column("jpg").to_pylist()]
    p = image_processor(data)
    blurred, plain = p.resize(p.probe(images[0]), boxes[0]).data, p.resize(p.probe(images[0])).data
    assert blurred != plain and kept.column("jpg")[0].as_py() == blurred
    assert kept.column("jpg")[1].as_py() == p.resize(p.probe(images[2])).data  # no boxes: as without bbox_col
