"""CLIP_benchmark's `wds_*` eval sets: read as webdataset reads them, scored as clip_benchmark scores them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.config import EvalConfig
from evaluation.datasets import open_dataset
from evaluation.run import run_evaluation
from tests.support.oracle import run_oracle
from tests.support.wds_sets import COLORS, TEMPLATES, write_wds_set

ORACLE_SCRIPT = Path(__file__).parent / "support" / "clip_benchmark_oracle.py"
VIT_TINY = Path(__file__).parents[1] / "training" / "model" / "model_configs" / "ViT-Tiny.json"
SEED = 7  # a random ViT-Tiny whose predictions differ between images on this set (checked below)


def _webdataset_samples(root: Path, shards: int) -> list[dict]:
    """The samples as the webdataset package groups them, in CLIP_benchmark's shard order."""
    import webdataset as wds

    urls = [str(root / "test" / f"{i}.tar") for i in range(shards)]
    return list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda src: src, empty_check=False))


def test_classification_set_reads_keys_labels_images_names_and_templates_as_webdataset_does(tmp_path, monkeypatch):
    import evaluation.wds

    monkeypatch.setattr(evaluation.wds, "CHUNK_SAMPLES", 2)  # read units of 2, 2, 1 samples per shard
    no_image = {"__key__": "zz-no-image", "cls": b"0"}
    write_wds_set(tmp_path, per_class=3, shards=2, extra_samples=[no_image])
    ds = open_dataset(str(tmp_path), need_labels=True)
    assert [(c.row_start, c.num_rows, c.tar_skip) for c in ds.chunks] == [
        (0, 2, 0),
        (2, 2, 2),
        (4, 1, 4),
        (5, 2, 0),
        (7, 2, 2),
        (9, 1, 4),
    ]
    assert ds.format == "wds" and ds.image_in_tar and ds.name == tmp_path.name
    assert ds.classnames == list(COLORS) and ds.templates == TEMPLATES
    assert ds.rejected == {"missing_image": 1}
    oracle = [s for s in _webdataset_samples(tmp_path, 2) if any(e in s for e in ("webp", "png", "jpg"))]
    assert ds.meta.column("key").to_pylist() == [s["__key__"] for s in oracle]
    assert ds.meta.column("label").to_pylist() == [int(s["cls"]) for s in oracle]
    rows = {int(r): img for b in ds.iter_image_batches(4) for r, img in zip(b["row_id"], b["image"])}
    images = [rows[r] for r in ds.meta.column("row_id").to_pylist()]
    assert images == [s.get("webp") or s.get("png") or s.get("jpg") for s in oracle]
    # The split folder itself names the same set; head() keeps the shards readable.
    again = open_dataset(str(tmp_path / "test"), need_labels=True).head(4)
    assert again.meta.column("key").to_pylist() == [s["__key__"] for s in oracle[:4]]
    assert sum(len(b["row_id"]) for b in again.iter_image_batches(8)) >= 4


def test_retrieval_set_reads_the_lines_of_txt_as_captions(tmp_path):
    write_wds_set(tmp_path, kind="retrieval", per_class=2, shards=1, nshards_file=False)
    ds = open_dataset(str(tmp_path), need_captions=True)
    oracle = _webdataset_samples(tmp_path, 1)
    assert ds.meta.column("captions").to_pylist() == [s["txt"].decode().splitlines() for s in oracle]
    with pytest.raises(ValueError, match="is a retrieval set"):
        open_dataset(str(tmp_path), need_labels=True)


def test_the_train_split_is_read_for_the_probe_s_training_key(tmp_path):
    import shutil

    write_wds_set(tmp_path, per_class=1, shards=1)
    shutil.copytree(tmp_path / "test", tmp_path / "train")
    train = open_dataset(str(tmp_path), need_labels=True, what="eval.train_dataset")
    assert train.chunks[0].file == str(tmp_path / "train" / "0.tar") and train.classnames == list(COLORS)
    assert open_dataset(str(tmp_path), need_labels=True).chunks[0].file == str(tmp_path / "test" / "0.tar")


def test_nshards_naming_a_missing_shard_is_an_error_naming_the_file(tmp_path):
    write_wds_set(tmp_path, per_class=1, shards=1)
    (tmp_path / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(FileNotFoundError, match=r"nshards.txt says 2 shards but 1 are missing .*1\.tar"):
        open_dataset(str(tmp_path), need_labels=True)


@pytest.mark.slow
def test_clipray_eval_on_a_wds_set_equals_clip_benchmark_on_the_same_model(tmp_path, oracle_python):
    write_wds_set(tmp_path / "cls", per_class=4, shards=2)
    write_wds_set(tmp_path / "ret", kind="retrieval", per_class=4, shards=2)
    model_dir = tmp_path / "open_clip_model"
    got = run_oracle(
        oracle_python,
        ORACLE_SCRIPT.read_text(),
        *("--config", str(VIT_TINY), "--model-dir", str(model_dir), "--seed", str(SEED), "--out", str(tmp_path)),
        *("--workers", "0", "--predictions"),
        str(tmp_path / "cls"),
        "zeroshot_classification",
        str(tmp_path / "ret"),
        "zeroshot_retrieval",
        cwd=tmp_path,
    )
    theirs_cls, theirs_ret = got["metrics"]
    their_preds = got["predictions"][0]
    assert len(set(their_preds)) > 1  # a model that predicts one class everywhere would prove little

    config = json.loads((model_dir / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    common = dict(
        model=str(model_dir / "open_clip_model.safetensors"),
        model_name=str(tmp_path / "model_config.json"),
        engine="local",  # the Ray engine runs the same embedder (tests/test_eval_run.py)
    )
    out = tmp_path / "ours"
    cls_cfg = EvalConfig(**common, dataset=str(tmp_path / "cls"), output=str(out / "cls.json"), dump_predictions=True)
    ours_cls = run_evaluation(cls_cfg)
    preds = [json.loads(line)["pred"] for line in (out / "cls.predictions.jsonl").read_text().splitlines()]
    assert preds == their_preds
    assert ours_cls["dataset"] == "cls" and ours_cls["clipray"]["num_templates"] == len(TEMPLATES)
    assert ours_cls["metrics"]["acc1"] == pytest.approx(theirs_cls["acc1"])
    assert ours_cls["metrics"]["mean_per_class_recall"] == pytest.approx(theirs_cls["mean_per_class_recall"])

    ret_cfg = EvalConfig(**common, task="retrieval", recall_k=[1, 5], dataset=str(tmp_path / "ret"))
    ours_ret = run_evaluation(ret_cfg)["metrics"]
    assert set(ours_ret) == set(theirs_ret)
    for key, value in theirs_ret.items():
        assert ours_ret[key] == pytest.approx(value, abs=1e-6), key  # theirs is float32
    assert 0 < np.mean(list(ours_ret.values())) < 1


def test_a_wds_set_under_an_s3_prefix_is_read_like_a_local_one(tmp_path):
    from storage import StorageConfig
    from tests.support.s3_server import S3TestServer

    write_wds_set(tmp_path / "wds_cars_test", per_class=2, shards=2)
    local = open_dataset(str(tmp_path / "wds_cars_test"), need_labels=True)
    with S3TestServer() as s3:
        s3.create_bucket("eval-wds")  # moto's buckets are process-wide: a name of its own
        s3.filesystem().put(str(tmp_path / "wds_cars_test"), "eval-wds/", recursive=True)
        storage = StorageConfig(storage_options=s3.storage_options())
        remote = open_dataset("s3://eval-wds/wds_cars_test", need_labels=True, storage=storage)
        assert remote.chunks[0].file == "s3://eval-wds/wds_cars_test/test/0.tar" and remote.name == "cars"
        assert remote.classnames == local.classnames and remote.templates == local.templates
        assert remote.meta.select(["key", "label"]).equals(local.meta.select(["key", "label"]))
        got = [img for b in remote.iter_image_batches(3) for img in b["image"]]
    assert got == [img for b in local.iter_image_batches(3) for img in b["image"]]
