"""Four gloo ranks against one process holding everything, all in one spawn (4 processes cost a few
seconds to start): the contrastive loss and its feature gradients, exact accumulation under DDP and
FSDP, and validation (loss, retrieval, zero-shot) computed by 4 workers with uneven shares of the
held-out set (one rank with none, so zero-shot runs first there) equal to the single-process values.
"""

from __future__ import annotations

import os

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.gloo import run_ranks
from tests.test_loop import batch, grads_of, tiny_clip
from tests.test_loss import DIM, GLOBAL_BATCH, _features
from training.loop import LoopSettings, TrainLoop
from training.loss import contrastive_loss
from training.model import create_model
from training.trainer_state import load_checkpoint, save_checkpoint
from training.validation import ZeroShot, validation_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 4
TRAIN_BATCH = 16  # 4 per rank, 2 micro-batches of 2
VAL_SHARES = (5, 3, 3, 0)  # held-out pairs per rank: 3, 2, 2 and 0 batches of 2
VAL_BATCH = 2
ZEROSHOT_BATCH = 2  # 9 labelled images over 4 ranks: 1, 1, 1 and 2 batches
STRATEGIES = ("ddp", "fsdp")


def _val_batches(rank: int) -> list[dict]:
    images, tokens = batch(sum(VAL_SHARES), seed=7)
    lo = sum(VAL_SHARES[:rank])
    hi = lo + VAL_SHARES[rank]
    return [
        {"image": images[i : min(i + VAL_BATCH, hi)], "tokens": tokens[i : min(i + VAL_BATCH, hi)]}
        for i in range(lo, hi, VAL_BATCH)
    ]


def _zeroshot(folder: str, rank: int, world: int) -> ZeroShot:
    return ZeroShot(
        os.path.join(folder, "zeroshot.parquet"),
        None,
        os.path.join(folder, "templates.txt"),
        rank=rank,
        world_size=world,
        batch_size=ZEROSHOT_BATCH,
    )


class Towers(nn.Module):
    """Two linear 'encoders' and a learned temperature: enough to check the gradient plumbing."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(10, DIM)
        self.text = nn.Linear(6, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # DDP needs every parameter used: the bias only exists for SigLIP.
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if kind == "siglip" else None

    def forward(self, x, t):
        bias = None if self.logit_bias is None else self.logit_bias * 1.0
        return (F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1), self.logit_scale.exp(), bias)


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(GLOBAL_BATCH, 10, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g)


def _rank_work(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    out: dict = {}
    for kind in ("clip", "siglip"):
        rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        # Features as leaves: the gradient each rank gets back for its own rows.
        img, txt = (f[rows].float().clone().requires_grad_(True) for f in _features(9))
        feature_loss = contrastive_loss(kind, img, txt, torch.tensor(14.0), torch.tensor(-5.0))
        feature_loss.backward()
        # A DDP model: parameter gradients after DDP's averaging.
        model = nn.parallel.DistributedDataParallel(Towers(kind))
        x, t = _inputs()
        loss = contrastive_loss(kind, *model(x[rows], t[rows]))
        loss.backward()
        out[kind] = {
            "feature_loss": feature_loss.detach(),
            "img_grad": img.grad,
            "txt_grad": txt.grad,
            "loss": loss.detach(),
            "grads": {n: p.grad for n, p in model.module.named_parameters()},
        }
    images, tokens = batch(TRAIN_BATCH)
    local = slice(rank * TRAIN_BATCH // WORLD, (rank + 1) * TRAIN_BATCH // WORLD)
    for strategy in STRATEGIES:
        loop = TrainLoop(tiny_clip(), settings(strategy))
        loss = loop.compute_gradients(images[local], tokens[local])
        grads = {
            n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in loop.module.named_parameters()
            if p.grad is not None
        }
        # The same loop (weights not stepped) validates on uneven shares; the last rank has none.
        metrics = validation_metrics(
            loop, _val_batches(rank), rank=rank, loss="clip", chunk=4, zeroshot=_zeroshot(out_dir, rank, WORLD)
        )
        out[strategy] = {"loss": loss, "grads": grads, "metrics": metrics}
        # Step 1 done; FSDP saves a sharded checkpoint, DDP takes step 2 (the reference for a resume).
        loop.apply_gradients()
        if strategy == "fsdp":
            save_checkpoint(loop, os.path.join(out_dir, "fsdp-checkpoint"), {"step": 1})
        else:
            loop.step(*(t[local] for t in batch(TRAIN_BATCH, seed=1)))
            out["ddp_two_steps"] = loop.model_state_dict()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def settings(strategy: str) -> LoopSettings:
    # eps 1e-3, not 1e-6: AdamW's first steps move each weight by ~lr * g / (|g| + eps), so with a tiny
    # eps a gradient that is float noise (an attention key bias's, ~1e-9) moves it by +-lr depending on
    # the order the ranks summed in; the comparisons below are about the resume, not that noise.
    return LoopSettings(total_steps=10, lr=1e-3, warmup=0, eps=1e-3, micro_batch_size=2, strategy=strategy)


def _resume_on_two_ranks(rank: int, out_dir: str) -> None:
    """The 4 ranks' sharded FSDP checkpoint resumed by 2 FSDP ranks for step 2."""
    torch.set_num_threads(1)
    torch.manual_seed(1)
    loop = TrainLoop(create_model("ViT-Tiny"), settings("fsdp"))  # other initial weights
    extra = load_checkpoint(loop, os.path.join(out_dir, "fsdp-checkpoint"))
    half = TRAIN_BATCH // 2
    loop.step(*(t[rank * half : (rank + 1) * half] for t in batch(TRAIN_BATCH, seed=1)))
    state = loop.model_state_dict()  # gathered onto rank 0
    if rank == 0:
        torch.save({"extra": extra, "step": loop.step_count, "model": state}, os.path.join(out_dir, "resumed.pt"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    from clipray.demo_data import draw_image, encode_jpeg, make_samples

    folder = tmp_path_factory.mktemp("four-ranks")
    samples = make_samples("zs", 1, 3)[::5][:9]
    pq.write_table(
        pa.table(
            {
                "jpg": pa.array([encode_jpeg(draw_image(s, 64)) for s in samples], pa.binary()),
                "label": [s.shape for s in samples],
            }
        ),
        folder / "zeroshot.parquet",
    )
    (folder / "templates.txt").write_text("a {c}\na picture of a {c}\n")
    run_ranks(_rank_work, WORLD, folder)
    run_ranks(_resume_on_two_ranks, 2, folder)
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_four_ranks_give_the_loss_and_gradients_of_the_concatenated_batch(kind, four_ranks):
    ranks = [r[kind] for r in four_ranks[1]]
    # Reference: one process, the whole batch.
    img, txt = (f.float().requires_grad_(True) for f in _features(9))
    ref = contrastive_loss(kind, img, txt, torch.tensor(14.0), torch.tensor(-5.0))
    ref.backward()
    assert (sum(r["feature_loss"] for r in ranks) / WORLD).item() == pytest.approx(ref.item(), abs=1e-5)
    # Each rank's feature gradient sums every rank's loss; DDP's averaging divides by WORLD.
    torch.testing.assert_close(torch.cat([r["img_grad"] for r in ranks]) / WORLD, img.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r["txt_grad"] for r in ranks]) / WORLD, txt.grad, atol=1e-5, rtol=0)

    model = Towers(kind)
    x, t = _inputs()
    loss = contrastive_loss(kind, *model(x, t))
    loss.backward()
    assert (sum(r["loss"] for r in ranks) / WORLD).item() == pytest.approx(loss.item(), abs=1e-5)
    for name, p in model.named_parameters():
        for rank, r in enumerate(ranks):
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-5, rtol=0, msg=f"{kind} rank {rank}: {name}")
    # A gradient that is not trivially zero everywhere (the test could not fail otherwise).
    assert model.image.weight.grad.abs().max() > 1e-4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_four_ranks_accumulating_micro_batches_match_one_process_with_the_whole_batch(strategy, four_ranks):
    images, tokens = batch(TRAIN_BATCH)
    big = TrainLoop(tiny_clip(), settings("ddp"))
    big_loss = big.compute_gradients(images, tokens)
    expected = grads_of(big)
    ranks = [r[strategy] for r in four_ranks[1]]
    for rank, got in enumerate(ranks):
        assert got["grads"].keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {name}")
    assert (sum(r["loss"] for r in ranks) / WORLD).item() == pytest.approx(big_loss.item(), abs=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_four_workers_with_uneven_validation_shares_match_the_single_process_metrics(strategy, four_ranks):
    folder, ranks = four_ranks
    loop = TrainLoop(tiny_clip(), LoopSettings(total_steps=10))  # the weights every rank validated
    everything = [b for r in range(WORLD) for b in _val_batches(r)]
    expected = validation_metrics(loop, everything, rank=0, loss="clip", chunk=4, zeroshot=_zeroshot(folder, 0, 1))
    assert {"val_loss", "val_image_retrieval_recall@1", "zeroshot_acc1"} <= expected.keys()
    assert expected["val_samples"] == sum(VAL_SHARES)
    got = ranks[0][strategy]["metrics"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    assert all(r[strategy]["metrics"] == {} for r in ranks[1:])  # the metrics are rank 0's to report
    assert np.isfinite(got["val_loss"])


def test_sharded_fsdp_checkpoint_resumes_on_another_world_size_like_an_uninterrupted_ddp_run(four_ranks):
    folder, ranks = four_ranks
    shards = sorted(p.name for p in (folder / "fsdp-checkpoint" / "shards").iterdir())
    assert len(shards) == WORLD and all(name.endswith(".safetensors") for name in shards)  # one per rank
    assert not (folder / "fsdp-checkpoint" / "model.safetensors").exists()  # nothing gathered on rank 0
    resumed = torch.load(folder / "resumed.pt")
    assert resumed["extra"] == {"step": 1} and resumed["step"] == 2
    expected = ranks[0]["ddp_two_steps"]
    assert resumed["model"].keys() == expected.keys()
    start = tiny_clip().state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(resumed["model"][name], value, atol=1e-6, rtol=0, msg=name)
    # Two steps at lr 1e-3 moved the weights far beyond the tolerance (the check could fail).
    assert max((expected[n] - start[n]).abs().max().item() for n in start) > 1e-3


def test_sharded_fsdp_checkpoint_resumes_in_one_process(four_ranks):
    folder, ranks = four_ranks
    loop = TrainLoop(create_model("ViT-Tiny"), settings("ddp"))
    assert load_checkpoint(loop, folder / "fsdp-checkpoint") == {"step": 1}
    loop.step(*batch(TRAIN_BATCH, seed=1))
    for name, value in ranks[0]["ddp_two_steps"].items():
        torch.testing.assert_close(loop.module.clip.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


def test_sharded_checkpoint_loads_with_no_unpickling_and_ignores_a_planted_metadata_pickle(
    four_ranks, tmp_path, monkeypatch
):
    import pickle
    import shutil

    from tests.test_trainer_state_files import CreatesFile

    folder, _ = four_ranks
    ckpt = tmp_path / "ckpt"
    shutil.copytree(folder / "fsdp-checkpoint", ckpt)
    marker = tmp_path / "code-ran"
    with open(ckpt / "shards" / ".metadata", "wb") as fh:  # where torch's default format keeps a pickle
        pickle.dump(CreatesFile(marker), fh)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, attr, refuse)
    loop = TrainLoop(create_model("ViT-Tiny"), settings("fsdp"))
    assert load_checkpoint(loop, ckpt) == {"step": 1} and loop.step_count == 1
    assert not marker.exists()


def test_sharded_checkpoint_of_another_model_is_refused_naming_the_tensor(four_ranks):
    from training.model import CheckpointError

    folder, _ = four_ranks
    loop = TrainLoop(create_model("ViT-Tiny", width_mult=0.5), settings("ddp"))
    before = {n: p.detach().clone() for n, p in loop.module.named_parameters()}
    with pytest.raises(CheckpointError, match=r"shards: the sharded checkpoint does not fit this model \(.*shape"):
        load_checkpoint(loop, folder / "fsdp-checkpoint")
    assert all(torch.equal(p, before[n]) for n, p in loop.module.named_parameters()) and loop.step_count == 0
