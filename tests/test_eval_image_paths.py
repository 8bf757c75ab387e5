"""Image paths in an eval table's metadata: kept under the image root (the table's folder or
eval.image_root) unless eval.allow_external_image_paths; unsafe rows are dropped and counted."""

from __future__ import annotations

import logging
import os

import pytest
from pydantic import ValidationError

from evaluation.config import EvalConfig
from evaluation.datasets import open_dataset
from evaluation.image_paths import UNSAFE_IMAGE_PATH, ImagePathResolver
from tests.test_eval_datasets import color_image

UNSAFE_ROWS = {
    "absolute": "{outside}/secret.png",
    "dotdot": "../outside/secret.png",
    "dotdot_deep": "img/../../outside/secret.png",
    "http": "http://127.0.0.1:9/latest/meta-data.png",
    "s3_on_a_local_table": "s3://another-bucket/x.png",
    "file_url": "file://{outside}/secret.png",
    "fsspec_chain": "img/r.png::http://127.0.0.1:9/x.zip",
    "unknown_scheme": "nosuchscheme://x/y.png",
}


@pytest.fixture
def layout(tmp_path):
    """tmp/data/{pairs.csv, img/r.png, img/g.png}, tmp/outside/secret.png; the table names each
    safe image once and every unsafe kind once."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "img").mkdir(parents=True)
    outside.mkdir()
    (data / "img" / "r.png").write_bytes(color_image("red"))
    (data / "img" / "g.png").write_bytes(color_image("green"))
    (outside / "secret.png").write_bytes(color_image("blue"))
    safe = ["img/r.png", f"{data}/img/g.png"]  # relative, and absolute inside the table's folder
    unsafe = [v.format(outside=outside) for v in UNSAFE_ROWS.values()]
    rows = [(p, "red" if "r.png" in p else "green") for p in safe] + [(p, "blue") for p in unsafe]
    (data / "pairs.csv").write_text("filepath,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return data, outside


def test_paths_leaving_the_tables_folder_are_dropped_and_counted(layout, caplog):
    data, _ = layout
    with caplog.at_level(logging.WARNING, logger="evaluation.tables"):
        ds = open_dataset(str(data / "pairs.csv"), need_labels=True)
    assert ds.meta.column("image").to_pylist() == [str(data / "img" / "r.png"), str(data / "img" / "g.png")]
    assert ds.rejected == {UNSAFE_IMAGE_PATH: len(UNSAFE_ROWS)}
    message = caplog.text
    assert f"{len(UNSAFE_ROWS)} rows dropped as unsafe_image_path" in message
    assert "eval.image_root" in message and "eval.allow_external_image_paths: true" in message


def test_a_table_with_only_unsafe_paths_says_how_to_allow_them(layout):
    data, outside = layout
    (data / "only_outside.csv").write_text(f"filepath,label\n{outside}/secret.png,blue\n../outside/secret.png,blue\n")
    with pytest.raises(
        ValueError,
        match=r"no usable rows \(\{'unsafe_image_path': 2\}\).*"
        r"set eval.image_root .* or eval.allow_external_image_paths: true",
    ):
        open_dataset(str(data / "only_outside.csv"), need_labels=True)


def test_image_root_widens_where_paths_may_point(layout):
    data, outside = layout
    ds = open_dataset(str(data / "pairs.csv"), need_labels=True, image_root=str(data.parent))
    images = ds.meta.column("image").to_pylist()
    # ../outside and the absolute path now lie under the root; URLs, chains and unknown schemes do not.
    assert images[:2] == [str(data / "img" / "r.png"), str(data / "img" / "g.png")]
    assert sorted(set(images[2:])) == [str(outside / "secret.png")]
    assert ds.rejected == {UNSAFE_IMAGE_PATH: 4}


def test_allow_external_image_paths_takes_the_table_as_given(layout):
    data, outside = layout
    ds = open_dataset(str(data / "pairs.csv"), need_labels=True, allow_external_image_paths=True)
    images = ds.meta.column("image").to_pylist()
    assert ds.rejected == {} and len(images) == 2 + len(UNSAFE_ROWS)
    assert "http://127.0.0.1:9/latest/meta-data.png" in images and "s3://another-bucket/x.png" in images
    assert str(data / "../outside/secret.png") in images  # relative paths are still joined to the folder


def test_a_symlink_inside_the_root_is_followed_but_dotdot_through_it_is_not(tmp_path):
    data, shared = tmp_path / "data", tmp_path / "shared"
    data.mkdir()
    (shared / "deep").mkdir(parents=True)
    (shared / "deep" / "a.png").write_bytes(color_image("red"))
    os.symlink(shared / "deep", data / "images")  # a data set linked to shared storage
    (data / "t.csv").write_text("filepath,label\nimages/a.png,red\nimages/../../shared/deep/a.png,red\n")
    ds = open_dataset(str(data / "t.csv"), need_labels=True)
    assert ds.meta.column("image").to_pylist() == [str(data / "images" / "a.png")]
    assert ds.rejected == {UNSAFE_IMAGE_PATH: 1}


def test_remote_tables_keep_paths_under_their_prefix():
    resolver = ImagePathResolver("s3://bucket/sets/coco")
    assert resolver.resolve("val/1.jpg") == ("s3://bucket/sets/coco/val/1.jpg", "", "")
    assert resolver.resolve("s3a://bucket/sets/coco/val/2.jpg")[0] == "s3://bucket/sets/coco/val/2.jpg"
    for value in (
        "../other/1.jpg",
        "s3://bucket/sets/cocoa/1.jpg",
        "s3://other-bucket/1.jpg",
        "/etc/hosts",
        "gs://bucket/sets/coco/1.jpg",
        "val/../../../../x.jpg",
    ):
        path, reason, detail = resolver.resolve(value)
        assert (path, reason) == (None, UNSAFE_IMAGE_PATH), value
        assert repr(value) in detail
    web = ImagePathResolver("/tables", image_root="https://example.org/data")
    assert web.resolve("https://example.org/data/a.jpg")[0] == "https://example.org/data/a.jpg"
    assert web.resolve("https://example.org/data/%2e%2e/admin.jpg")[1] == UNSAFE_IMAGE_PATH
    assert web.resolve("http://example.org/data/a.jpg")[1] == UNSAFE_IMAGE_PATH
    assert ImagePathResolver("/t").resolve("") == (None, "missing_image", "no image path")


def test_image_root_and_allow_external_are_checked_on_load():
    with pytest.raises(ValidationError, match="eval.image_root '/data' and eval.allow_external_image_paths"):
        EvalConfig(image_root="/data", allow_external_image_paths=True)
    with pytest.raises(ValidationError, match="not an fsspec chain"):
        EvalConfig(image_root="simplecache::s3://bucket/x")
    assert EvalConfig(image_root="s3://bucket/images").image_root == "s3://bucket/images"
    with pytest.raises(ValueError, match="eval.image_root 'nosuchscheme://x'"):
        ImagePathResolver("/t", image_root="nosuchscheme://x")


def test_the_eval_section_keys_reach_the_dataset_clipray_eval_opens(layout):
    from evaluation.run import open_eval_dataset

    data, outside = layout
    default = open_eval_dataset(str(data / "pairs.csv"), EvalConfig(dataset=str(data / "pairs.csv")), need_labels=True)
    assert default.rejected == {UNSAFE_IMAGE_PATH: len(UNSAFE_ROWS)}
    widened = open_eval_dataset(
        str(data / "pairs.csv"),
        EvalConfig(dataset=str(data / "pairs.csv"), image_root=str(data.parent)),
        need_labels=True,
    )
    assert widened.rejected == {UNSAFE_IMAGE_PATH: 4}
    given = open_eval_dataset(
        str(data / "pairs.csv"),
        EvalConfig(dataset=str(data / "pairs.csv"), allow_external_image_paths=True),
        need_labels=True,
    )
    assert given.rejected == {}
