"""End-to-end training with Ray Train on 2 CPU workers (gloo) over the demo's shards:
the loss falls, outputs land where DESIGN.md says, a SIGKILLed worker is replaced from the last
checkpoint and the run ends exactly like an uninterrupted one (that run reads the same rows as
img2dataset's WebDataset tars, so it also pins tars = Parquet end to end), a finished run resumes at its end,
and S3 storage (moto on 127.0.0.1) checkpoints and, after a kill and a rerun, resumes exactly.

The runs share one config; the uninterrupted run is the reference the interrupted ones must match
(same step count, learning rate and parameters): the data order, the crops and every random
number are functions of the config and the data position, so resuming changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.support.train_runs import WorkerKiller, final_state, local_checkpoint, rows
from tests.support.train_shards import write_shards, write_webdataset_shards
from training.config import ModelConfig, TrainConfig

pytestmark = pytest.mark.slow

STEPS = 100
MODEL = ModelConfig(name="ViT-Tiny", width_mult=0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    write_shards(root / "shards", copies=2, rows_per_shard=200, side=64)
    write_webdataset_shards(root / "wds", copies=2, rows_per_shard=200, side=64)  # the same rows as tars
    write_shards(root / "val", copies=1, rows_per_shard=300, side=64, split="val", seed=1)
    # A labelled table for zero-shot accuracy: the shape of each held-out image.
    from clipray.demo_data import draw_image, encode_jpeg, make_samples

    samples = make_samples("zs", 1, 7)[::2]
    pq.write_table(
        pa.table(
            {
                "jpg": pa.array([encode_jpeg(draw_image(s, 64)) for s in samples], pa.binary()),
                "label": [s.shape for s in samples],
            }
        ),
        root / "zeroshot.parquet",
    )
    (root / "templates.txt").write_text("a {c}\na picture of a {c}\n")
    return root


def config(data: Path, storage: str, name: str, **overrides) -> TrainConfig:
    values = dict(
        data=[str(data / "shards")],
        storage_path=storage,
        name=name,
        num_workers=2,
        cpus_per_worker=1,
        batch_size=32,
        samples=32 * STEPS,
        lr=2e-3,
        warmup=20,
        weight_decay=0.1,
        checkpoint_every=50,
        keep_checkpoints=2,
        log_every=10,
        num_preprocess_actors=1,
        preprocess_cpus=0.5,
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def reference(data, ray_local, tmp_path_factory):
    """The uninterrupted run, with validation, retrieval and zero-shot at the end."""
    from training.driver import run_training

    storage = tmp_path_factory.mktemp("runs")
    cfg = config(
        data,
        str(storage),
        "reference",
        val_data=[str(data / "val")],
        val_every=STEPS,
        zeroshot_data=str(data / "zeroshot.parquet"),
        zeroshot_templates=str(data / "templates.txt"),
    )
    result = run_training(MODEL, cfg)
    return result, storage / "reference"


def test_training_lowers_the_loss_and_writes_the_run_layout(reference):
    result, run_dir = reference
    table = rows(run_dir)
    assert [r["step"] for r in table] == list(range(10, STEPS + 1, 10))
    first, last = table[0]["loss"], np.mean([r["loss"] for r in table[-3:]])
    assert first > 3.0 and last < 0.7 * first, (first, last)  # chance level is ln(32) = 3.47
    for row in table:
        assert {"step", "samples_seen", "loss", "lr", "logit_scale", "samples_per_s", "data_wait_s"} <= row.keys()
        assert np.isfinite(row["loss"]) and row["samples_seen"] == row["step"] * 32
    end = table[-1]
    assert end["val_samples"] == 300 and end["val_loss"] < np.log(32)
    assert end["val_text_retrieval_recall@10"] > 10 / 300  # better than chance
    assert 0.0 <= end["zeroshot_acc1"] <= 1.0 and "zeroshot_mean_per_class_recall" in end
    assert result.metrics["step"] == STEPS and result.final_dir == str(run_dir / "final")
    # Checkpoints every 50 steps, the last 2 kept; TensorBoard events; final/ loads as a model.
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000000050", "checkpoint_000000100"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from training.model import load_model

    model = load_model(run_dir / "final")
    assert model.config["vision_cfg"]["width"] == 64
    torch.testing.assert_close(model.state_dict()["logit_scale"], final_state(run_dir)["logit_scale"])


@pytest.mark.heavy
def test_killed_worker_is_replaced_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run(
    data, reference, tmp_path
):
    """Run on the WebDataset twin of the reference's Parquet shards (img2dataset's tars, the same
    rows): killed and resumed, it still ends exactly like the uninterrupted Parquet run, so the tars
    give the same order, crops and data position as Parquet, and the resume lands on the same row."""
    from training.driver import run_training

    _, ref_dir = reference
    run_dir = tmp_path / "fault"
    cfg = config(data, str(tmp_path), "fault", max_failures=1)
    cfg = cfg.model_copy(update={"data": [str(data / "wds" / "{00000..00002}.tar")]})
    with WorkerKiller(lambda: rows(run_dir), local_checkpoint(run_dir), min_step=50, rank=1) as killer:
        result = run_training(MODEL, cfg)
    assert killer.killed_at is not None and killer.killed_at < STEPS
    table = rows(run_dir)
    assert result.metrics["step"] == STEPS and table[-1]["restored_from_step"] >= 50
    assert [r["step"] for r in table] == list(range(10, STEPS + 1, 10))  # the failed attempt's extra rows replaced
    assert all(np.isfinite(r["loss"]) for r in table)
    ref = rows(ref_dir)
    # The same schedule and the same samples: step count, LR, losses and parameters as uninterrupted.
    assert [r["lr"] for r in table] == pytest.approx([r["lr"] for r in ref], rel=1e-9)
    assert [r["samples_seen"] for r in table] == [r["samples_seen"] for r in ref]
    assert [r["loss"] for r in table] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
    expected, got = final_state(ref_dir), final_state(run_dir)
    assert all(torch.isfinite(v).all() for v in got.values())
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_rerunning_a_finished_run_resumes_at_its_end_without_training_again(data, reference):
    from training.driver import run_training

    result, run_dir = reference
    before = rows(run_dir)
    weights = (run_dir / "final" / "model.safetensors").stat().st_mtime
    again = run_training(
        MODEL,
        config(
            data,
            str(run_dir.parent),
            "reference",
            val_data=[str(data / "val")],
            val_every=STEPS,
            zeroshot_data=str(data / "zeroshot.parquet"),
            zeroshot_templates=str(data / "templates.txt"),
        ),
    )
    assert rows(run_dir) == before  # no step trained, no row added
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime >= weights
    assert again.path == result.path


@pytest.mark.heavy
def test_s3_storage_checkpoints_and_resumes_on_the_loopback_server(data, ray_local, tmp_path):
    """The run folder on S3, reached with the train section's storage keys alone (endpoint and
    explicit keys): the Ray workers and controller, which do not share this process's environment,
    write checkpoints and metrics there."""
    from ray.train import TrainingFailedError

    from tests.support.s3_server import S3TestServer
    from training.driver import run_folder, run_training

    with S3TestServer() as s3:
        s3.create_bucket("runs")
        cfg = config(
            data,
            "s3://runs/clip",
            "s3run",
            samples=32 * 40,
            checkpoint_every=10,
            warmup=5,
            max_failures=0,
            s3_endpoint_url=s3.endpoint_url,
            storage_options=s3.credentials,
        )
        fs, run_path = run_folder(cfg).pyarrow()

        def remote_rows():
            try:
                with fs.open_input_stream(f"{run_path}/metrics.jsonl") as fh:
                    return [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]
            except OSError:
                return []

        def remote_checkpoint(step):
            from pyarrow import fs as pafs

            info = fs.get_file_info(f"{run_path}/checkpoint_{step:09d}/trainer_state.json")
            return info.type == pafs.FileType.File

        with WorkerKiller(remote_rows, remote_checkpoint, min_step=10, rank=0) as killer:
            with pytest.raises(TrainingFailedError):
                run_training(MODEL, cfg)
        assert killer.killed_at is not None
        result = run_training(MODEL, cfg)  # the same name: resumes from the checkpoint on S3
        assert result.path == "s3://runs/clip/s3run" and result.metrics["step"] == 40
        assert remote_rows()[-1]["restored_from_step"] >= 10
        assert [r["step"] for r in remote_rows()] == [10, 20, 30, 40]
        from pyarrow import fs as pafs

        for name in ("model.safetensors", "model_config.json"):
            assert fs.get_file_info(f"{run_path}/final/{name}").type == pafs.FileType.File
        with fs.open_input_stream(f"{run_path}/final/model.safetensors") as fh:
            from safetensors.torch import load as load_bytes

            resumed = load_bytes(fh.read())
    # The same run uninterrupted, on local storage: the resumed one ends with the same parameters.
    straight = tmp_path / "straight"
    run_training(MODEL, config(data, str(tmp_path), "straight", samples=32 * 40, checkpoint_every=10, warmup=5))
    for name, value in final_state(straight).items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.heavy
def test_fsdp_run_killed_mid_way_resumes_from_its_sharded_checkpoint(data, ray_local, tmp_path):
    """FSDP through Ray Train: every rank uploads its shards into the one checkpoint folder, a
    SIGKILLed worker's group restarts from them, validation with zero-shot runs on the sharded model,
    and final/ is one consolidated model.safetensors."""
    from training.driver import run_training
    from training.model import load_model

    steps = 20
    run_dir = tmp_path / "fsdp"
    cfg = config(
        data,
        str(tmp_path),
        "fsdp",
        strategy="fsdp",
        samples=32 * steps,
        checkpoint_every=10,
        max_failures=1,
        val_data=[str(data / "val")],
        val_every=steps,
        zeroshot_data=str(data / "zeroshot.parquet"),
        zeroshot_templates=str(data / "templates.txt"),
    )
    with WorkerKiller(lambda: rows(run_dir), local_checkpoint(run_dir), min_step=10, rank=1) as killer:
        result = run_training(MODEL, cfg)
    assert killer.killed_at is not None and killer.killed_at < steps
    table = rows(run_dir)
    assert result.metrics["step"] == steps and table[-1]["restored_from_step"] >= 10
    assert [r["step"] for r in table] == [10, 20] and all(np.isfinite(r["loss"]) for r in table)
    assert table[-1]["val_samples"] == 300 and 0.0 <= table[-1]["zeroshot_acc1"] <= 1.0
    last = run_dir / f"checkpoint_{steps:09d}"
    assert len(list((last / "shards").glob("*.safetensors"))) == 2  # one per rank
    assert not (last / "model.safetensors").exists()
    final = load_model(run_dir / "final")
    assert all(torch.isfinite(v).all() for v in final.state_dict().values())
