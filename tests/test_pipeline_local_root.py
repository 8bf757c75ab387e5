"""`data.local_root`: local images with a captions CSV, read from under the root and from nowhere
else (`..`, absolute paths, symlinks out, file:// outside, devices and folders are refused with a
reason); without it, file:// stays refused."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.config import DataConfig
from pipeline.local_files import LocalFiles
from tests.support.http_server import jpeg_bytes, png_bytes


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg_bytes(60, 40, seed=1))
    (root / "sub" / "b.png").write_bytes(png_bytes(50, 50, seed=2, mode="RGB"))
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(30, 30, seed=3))
    os.symlink(tmp_path / "secret.jpg", root / "escape.jpg")
    return root


def test_local_files_stay_under_the_root(tmp_path):
    root = _tree(tmp_path)
    files = LocalFiles(str(root), max_bytes=1 << 20)
    assert files.fetch("a.jpg").body == (root / "a.jpg").read_bytes()
    assert files.fetch(f"file://{root}/sub/b.png").body == (root / "sub" / "b.png").read_bytes()
    for url in (
        "../secret.jpg",
        "escape.jpg",
        str(tmp_path / "secret.jpg"),
        "file:///etc/passwd",
        "sub/../../secret.jpg",
    ):
        assert files.fetch(url).reason == "outside_local_root", url
    assert files.fetch("missing.jpg").reason == "local_file_error"
    assert files.fetch("sub").reason == "local_file_error"  # a folder
    assert LocalFiles(str(root), max_bytes=100).fetch("a.jpg").reason == "response_too_large"
    with pytest.raises(ValidationError, match="data.local_root .* is not a folder"):
        DataConfig(local_root=str(tmp_path / "nope"))
    with pytest.raises(ValidationError, match="must be a local folder"):
        DataConfig(local_root="s3://bucket/images")


@pytest.mark.slow
def test_a_folder_of_images_with_a_captions_csv_becomes_shards(ray_local, tmp_path):
    from pipeline.run import run_pipeline

    root = _tree(tmp_path)
    rows = [
        ("a.jpg", "a local photo", "accepted"),
        (f"file://{root}/sub/b.png", "a png by file url", "accepted"),
        ("../secret.jpg", "outside", "outside_local_root"),
        ("escape.jpg", "a symlink out", "outside_local_root"),
        ("missing.jpg", "not there", "local_file_error"),
    ]
    (tmp_path / "captions.csv").write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c, _ in rows))
    data = DataConfig(
        input=str(tmp_path / "captions.csv"),
        output=str(tmp_path / "out"),
        local_root=str(root),
        num_download_actors=1,
        threads_per_actor=2,
        image_size=32,
        progress=False,
    )
    manifest = run_pipeline(data)
    assert (manifest["accepted"], manifest["reasons"]) == (2, {"outside_local_root": 2, "local_file_error": 1})
    kept = pq.read_table(sorted((tmp_path / "out" / "shards").glob("*.parquet")))
    assert kept.column("caption").to_pylist() == ["a local photo", "a png by file url"]
    assert kept.column("original_width").to_pylist() == [60, 50]
    # Without local_root a file:// URL is refused as before.
    plain = run_pipeline(data.model_copy(update={"local_root": None, "output": str(tmp_path / "out2")}))
    assert (plain["accepted"], plain["reasons"]) == (0, {"unsupported_scheme": len(rows)})
