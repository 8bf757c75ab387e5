"""Evaluation data sets: ImageFolder trees, CSV/Parquet tables, pipeline shards, S3; class names and templates."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import StorageConfig
from PIL import Image

from evaluation.datasets import open_dataset, resolve_classes
from evaluation.templates import fill_template, load_classnames, load_templates

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def color_image(color, size=(40, 30), fmt="PNG") -> bytes:
    """A solid image of one of COLORS, encoded (PNG: lossless, so equal colours give equal bytes)."""
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(COLORS[color], np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_color_folder(root, per_class=3, corrupt=False, mislabeled=False):
    """root/<color>/<i>.png; optionally a corrupt file and a green image filed under red."""
    for color in COLORS:
        (root / color).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / color / f"{i}.png").write_bytes(color_image(color))
    if corrupt:
        (root / "red" / "broken.jpg").write_bytes(b"this is not an image")
    if mislabeled:
        (root / "red" / "zz_green.png").write_bytes(color_image("green"))
    (root / "red" / "notes.txt").write_text("not an image file; ignored by extension")
    return root


def write_color_shards(folder, per_class=3, row_group_size=4, extra_rows=()):
    """A pipeline-style output folder: folder/shards/part-0.parquet with key, caption, jpg, color."""
    rows = [
        {"key": f"{c}{i}", "caption": f"a {c} square", "jpg": color_image(c), "color": c, "shape": "square"}
        for c in COLORS
        for i in range(per_class)
    ]
    rows.extend(extra_rows)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "shards" / "part-0.parquet", row_group_size=row_group_size)
    return folder


def test_imagefolder_classes_are_sorted_folders_and_images_are_paths(tmp_path):
    write_color_folder(tmp_path, per_class=2, corrupt=True)
    (tmp_path / "blue" / "nested").mkdir()
    (tmp_path / "blue" / "nested" / "deep.PNG").write_bytes(color_image("blue"))
    ds = open_dataset(str(tmp_path), need_labels=True)
    assert ds.format == "imagefolder" and ds.classes == ["blue", "green", "red"]
    keys = ds.meta.column("key").to_pylist()
    assert "blue/nested/deep.PNG" in keys and "red/broken.jpg" in keys and "red/notes.txt" not in keys
    assert ds.num_rows == 2 * 3 + 2
    batches = list(ds.iter_image_batches(3))
    assert [len(b["row_id"]) for b in batches] == [3, 3, 2]
    assert batches[0]["image"][0].endswith("blue/0.png")
    names, idx, source = resolve_classes(ds.meta.column("label").to_pylist(), folder_classes=ds.classes)
    assert names == ["blue", "green", "red"] and source == "folder names"
    assert idx.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_imagenet_wordnet_folders_get_the_clip_class_names():
    wnids = [f"n{i:08d}" for i in range(1000)]
    names, idx, source = resolve_classes(["n00000000", "n00000999"], folder_classes=wnids)
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert idx.tolist() == [0, 999] and "ImageNet" in source
    with pytest.raises(ValueError, match="3 names but the ImageFolder tree has 1000"):
        resolve_classes(["n00000000"], folder_classes=wnids, classnames=["a", "b", "c"])


def test_parquet_image_bytes_stay_in_files_and_row_groups_are_read_in_order(tmp_path):
    write_color_shards(tmp_path, per_class=3, row_group_size=4)
    ds = open_dataset(str(tmp_path), label_col="color", caption_col="caption", need_labels=True)
    assert ds.format == "shards" and ds.image_in_parquet
    assert "jpg" not in ds.meta.column_names  # bytes are never loaded into the driver's table
    assert [(c.row_start, c.num_rows, c.row_group) for c in ds.chunks] == [(0, 4, 0), (4, 4, 1), (8, 1, 2)]
    rows = list(ds.iter_image_batches(5))
    row_ids = np.concatenate([b["row_id"] for b in rows])
    assert row_ids.tolist() == list(range(9))
    assert rows[0]["image"][0] == color_image("red")
    assert ds.meta.column("captions").to_pylist()[0] == ["a red square"]
    head = ds.head(5)
    assert head.num_rows == 5 and sum(c.num_rows for c in head.chunks) == 5


def test_rows_without_label_or_caption_are_dropped_and_counted(tmp_path):
    extra = [
        {"key": "x1", "caption": "no colour", "jpg": color_image("red"), "color": None, "shape": "square"},
        {"key": "x2", "caption": "", "jpg": color_image("red"), "color": "red", "shape": "square"},
    ]
    write_color_shards(tmp_path, per_class=1, extra_rows=extra)
    labels = open_dataset(str(tmp_path), label_col="color", need_labels=True)
    assert labels.num_rows == 4 and labels.rejected == {"missing_label": 1}
    captions = open_dataset(str(tmp_path), caption_col="caption", need_captions=True)
    assert captions.num_rows == 4 and captions.rejected == {"missing_caption": 1}
    # Row ids keep the file's positions, so row-group reads stay aligned.
    assert captions.meta.column("row_id").to_pylist() == [0, 1, 2, 3]
    assert labels.meta.column("row_id").to_pylist() == [0, 1, 2, 4]


def test_csv_paths_are_relative_to_the_table_and_repeated_paths_are_one_image(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.png").write_bytes(color_image("red"))
    (tmp_path / "img" / "g.png").write_bytes(color_image("green"))
    (tmp_path / "pairs.csv").write_text(
        'filepath,caption\nimg/r.png,a red square\nimg/g.png,a green square\nimg/r.png,"a red, red thing"\n'
    )
    ds = open_dataset(str(tmp_path / "pairs.csv"), caption_col="caption", need_captions=True)
    assert ds.image_column == "filepath"  # found when eval.image_col keeps the pipeline default 'jpg'
    assert ds.num_rows == 2
    assert ds.meta.column("captions").to_pylist() == [["a red square", "a red, red thing"], ["a green square"]]
    assert ds.meta.column("image").to_pylist()[0] == str(tmp_path / "img" / "r.png")


def test_a_missing_column_is_named_with_the_columns_found(tmp_path):
    write_color_shards(tmp_path, per_class=1)
    with pytest.raises(
        ValueError, match=r"eval.label_col 'label' is not a column \(columns: key, caption, jpg, color, shape\)"
    ):
        open_dataset(str(tmp_path), need_labels=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no captions"):
        open_dataset(str(write_color_folder(tmp_path / "tree", per_class=1)), need_captions=True)


def test_shards_on_s3_are_read_through_fsspec(tmp_path):
    from tests.support.s3_server import S3TestServer

    write_color_shards(tmp_path, per_class=2, row_group_size=3)
    with S3TestServer() as s3:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=s3.credentials["key"],
            aws_secret_access_key=s3.credentials["secret"],
        ).create_bucket(Bucket="eval")
        fs = s3.filesystem()
        fs.put(str(tmp_path / "shards" / "part-0.parquet"), "eval/held-out/shards/part-0.parquet")
        ds = open_dataset(
            "s3://eval/held-out",
            label_col="color",
            need_labels=True,
            storage=StorageConfig(storage_options=s3.storage_options()),
        )
        assert ds.num_rows == 6 and ds.chunks[0].file == "s3://eval/held-out/shards/part-0.parquet"
        images = np.concatenate([b["image"] for b in ds.iter_image_batches(4)])
    assert images[0] == color_image("red") and images[-1] == color_image("blue")


def test_labels_map_to_classes_by_index_name_or_sorted_value():
    names, idx, _ = resolve_classes(["dog", "cat", "dog"])
    assert names == ["cat", "dog"] and idx.tolist() == [1, 0, 1]
    names, idx, _ = resolve_classes([2, 0], classnames=["a", "b", "c"])
    assert idx.tolist() == [2, 0]
    names, idx, _ = resolve_classes([10, 2, 10], need_names=False)
    assert names == ["2", "10"] and idx.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="labels are integers"):
        resolve_classes([0, 1])
    with pytest.raises(ValueError, match=r"1 labels are not class names: \['cow'\]"):
        resolve_classes(["cow"], classnames=["cat", "dog"])


def test_builtin_templates_and_class_names_are_the_papers():
    assert len(load_templates("imagenet")) == 80
    assert load_templates("imagenet")[0] == "a bad photo of a {c}."
    assert len(load_templates("cifar10")) == 18 and load_templates("cifar100") == load_templates("cifar10")
    assert load_templates(None, dataset_name="cifar10") == load_templates("cifar10")
    assert load_templates(None) == load_templates("imagenet")
    assert len(load_classnames("imagenet")) == 1000
    assert load_classnames("cifar10")[:3] == ["airplane", "automobile", "bird"]
    cifar100 = load_classnames("cifar100")
    assert len(cifar100) == 100 and cifar100 == sorted(cifar100) and "aquarium fish" in cifar100
    assert fill_template("itap of a {c}.", "dog") == "itap of a dog."
    assert fill_template("a {} photo", "dog") == "a dog photo"


def test_user_template_and_class_name_files(tmp_path):
    (tmp_path / "t.txt").write_text("# my prompts\na photo of a {c}.\n\n{c}, seen from above\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {c}.", "{c}, seen from above"]
    (tmp_path / "t.json").write_text(json.dumps({"pets": ["a photo of my {c}."]}))
    assert load_templates(str(tmp_path / "t.json"), dataset_name="pets") == ["a photo of my {c}."]
    with pytest.raises(ValueError, match="not one of its keys"):
        load_templates(str(tmp_path / "t.json"), dataset_name="cars")
    (tmp_path / "bad.txt").write_text("a photo of a dog\n")
    with pytest.raises(ValueError, match=r"template 1 'a photo of a dog' has no class placeholder"):
        load_templates(str(tmp_path / "bad.txt"))
    (tmp_path / "names.txt").write_text("tabby cat\ngolden retriever\n")
    assert load_classnames(str(tmp_path / "names.txt")) == ["tabby cat", "golden retriever"]


def test_split_folders_pick_the_split_of_the_key(tmp_path):
    write_color_folder(tmp_path / "val", per_class=1)
    write_color_folder(tmp_path / "train", per_class=2)
    test = open_dataset(str(tmp_path), need_labels=True)
    train = open_dataset(str(tmp_path), need_labels=True, what="eval.train_dataset")
    assert (test.num_rows, train.num_rows) == (3, 6) and test.name == tmp_path.name
    assert test.meta.column("image").to_pylist()[0].startswith(str(tmp_path / "val"))
    write_color_folder(tmp_path / "only" / "train", per_class=1)
    with pytest.raises(ValueError, match=r"holds split folders \(train\) but no test or val/"):
        open_dataset(str(tmp_path / "only"), need_labels=True)


def test_numbered_and_wordnet_subset_folders_get_their_class_names(tmp_path):
    for folder in ("0", "2", "10"):  # ImageNetV2's layout: the folder number is the class index
        (tmp_path / "v2" / folder).mkdir(parents=True)
        (tmp_path / "v2" / folder / "a.png").write_bytes(color_image("red"))
    ds = open_dataset(str(tmp_path / "v2"), need_labels=True)
    names = [f"class {i}" for i in range(11)]
    got, idx, _ = resolve_classes(ds.meta.column("label").to_pylist(), folder_classes=ds.classes, classnames=names)
    assert got == names and sorted(idx.tolist()) == [0, 2, 10]
    with pytest.raises(ValueError, match="the class folders are integers"):
        resolve_classes(ds.meta.column("label").to_pylist(), folder_classes=ds.classes)
    # ImageNet-A/-R/-O: a subset of the WordNet ids names its classes from the 1000.
    got, idx, source = resolve_classes(["n01443537"], folder_classes=["n01440764", "n01443537"])
    assert got == ["tench", "goldfish"] and idx.tolist() == [1] and "2 of the 1000" in source
