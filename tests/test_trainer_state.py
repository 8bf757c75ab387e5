"""Checkpoints without pickle: a resumed loop continues bit-identically to an uninterrupted one (one
process, SigLIP with accumulation, the fp16 scaler; DDP and FSDP on 2 gloo ranks; across a world-size
change), and a planted pickle or a tampered trainer state is refused before anything is loaded."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.support.gloo import run_ranks
from tests.test_loop import WORLD, batch, tiny_clip
from training.loop import LoopSettings, TrainLoop
from training.model import create_model, load_model
from training.trainer_state import TENSORS_FILE, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, SAVE_AT = 4, 2


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def run_steps(loop: TrainLoop, data) -> list[tuple]:
    """One step per batch; after each, the loss, LR, loss scale and one draw from numpy's and
    Python's RNGs (as data code would draw), all exact."""
    out = []
    for images, tokens in data:
        result = loop.step(images, tokens)
        out.append((result.loss.item(), result.lr, loop.scaler.get_scale(), np.random.random(), random.random()))
    return out


def assert_same_loops(got: TrainLoop, expected: TrainLoop) -> None:
    assert (got.step_count, got.samples_seen) == (expected.step_count, expected.samples_seen)
    for (name, a), b in zip(expected.module.state_dict().items(), got.module.state_dict().values()):
        assert torch.equal(a, b), name
    want, have = expected.optimizer.state_dict(), got.optimizer.state_dict()
    assert have["param_groups"] == want["param_groups"] and have["state"].keys() == want["state"].keys()
    for index, values in want["state"].items():
        for key, value in values.items():
            assert torch.equal(have["state"][index][key], value), (index, key)
    assert got.scheduler.state_dict() == expected.scheduler.state_dict()
    assert got.scaler.state_dict() == expected.scaler.state_dict()


SETTINGS = {
    "clip": LoopSettings(total_steps=8, lr=1e-3, warmup=2),
    "siglip-accumulated": LoopSettings(total_steps=8, lr=1e-3, warmup=2, loss="siglip", micro_batch_size=2),
    "fp16-scaler": LoopSettings(total_steps=8, lr=1e-3, warmup=0, precision="amp_fp16", grad_clip=1.0),
}


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_resumed_loop_continues_bit_identically_to_an_uninterrupted_one(tmp_path, name):
    settings = SETTINGS[name]
    data = [batch(4, seed=s) for s in range(STEPS)]
    straight = TrainLoop(tiny_clip(patch_dropout=0.5), settings)  # patch dropout: the steps draw from torch's RNG
    seed_everything(7)
    expected = run_steps(straight, data)

    first = TrainLoop(tiny_clip(patch_dropout=0.5), settings)
    seed_everything(7)
    assert run_steps(first, data[:SAVE_AT]) == expected[:SAVE_AT]
    save_checkpoint(first, tmp_path, extra={"data": [{"pass": 0, "rows": 8}]})
    seed_everything(999)  # a fresh process: other weights, other random streams
    resumed = TrainLoop(create_model("ViT-Tiny", patch_dropout=0.5), settings)
    assert load_checkpoint(resumed, tmp_path) == {"data": [{"pass": 0, "rows": 8}]}
    assert run_steps(resumed, data[SAVE_AT:]) == expected[SAVE_AT:]
    assert_same_loops(resumed, straight)
    if name == "fp16-scaler":
        assert resumed.scaler.is_enabled() and resumed.scaler.state_dict()["_growth_tracker"] > 0
    if name == "siglip-accumulated":
        assert torch.equal(resumed.module.logit_bias, straight.module.logit_bias)


def test_load_restores_the_random_state_that_patch_dropout_draws_from(tmp_path):
    # Guards the test above: the step after a load depends on the RNG, and the load sets it.
    settings, data = SETTINGS["clip"], batch(4, seed=5)
    save_checkpoint(TrainLoop(tiny_clip(patch_dropout=0.5), settings), tmp_path)
    losses = []
    for seed_before, seed_after in ((1, None), (2, None), (1, 12345)):
        torch.manual_seed(seed_before)
        loop = TrainLoop(create_model("ViT-Tiny", patch_dropout=0.5), settings)
        load_checkpoint(loop, tmp_path)
        if seed_after is not None:
            torch.manual_seed(seed_after)
        losses.append(loop.step(*data).loss.item())
    assert losses[0] == losses[1] != losses[2]


# --------------------------------------------------------------------------------- two ranks on gloo
def rank_settings(strategy: str) -> LoopSettings:
    return LoopSettings(total_steps=8, lr=1e-3, warmup=1, loss="siglip", micro_batch_size=2, strategy=strategy)


def _resume_on_rank(rank: int, out_dir: str) -> None:
    """Per strategy: 3 steps straight vs 1 step, save, load into other weights, 2 steps; then the
    one-process checkpoint loaded under FSDP. Writes what the parent compares to rank{rank}.pt."""
    torch.set_num_threads(1)
    data = [tuple(t[rank * 4 : (rank + 1) * 4] for t in batch(8, seed=s)) for s in range(3)]
    results = {}
    for strategy in ("ddp", "fsdp"):
        folder = os.path.join(out_dir, strategy)
        straight = TrainLoop(tiny_clip(patch_dropout=0.5), rank_settings(strategy))
        seed_everything(7 + rank)
        expected = run_steps(straight, data)
        first = TrainLoop(tiny_clip(patch_dropout=0.5), rank_settings(strategy))
        seed_everything(7 + rank)
        run_steps(first, data[:1])
        save_checkpoint(first, folder)
        saved = {"model": first.model_state_dict(), "optimizer": first.optimizer_state_dict()}
        dist.barrier()  # rank 0 has written it
        seed_everything(999 + rank)
        resumed = TrainLoop(create_model("ViT-Tiny", patch_dropout=0.5), rank_settings(strategy))
        load_checkpoint(resumed, folder)
        results[strategy] = {"expected": expected[1:], "got": run_steps(resumed, data[1:]), "saved": saved}
        for name, loop in (("straight", straight), ("resumed", resumed)):  # full on rank 0 under FSDP
            results[strategy][name] = {
                "model": loop.model_state_dict(),
                "optimizer": loop.optimizer_state_dict(),
                "bias": loop.module.logit_bias.detach().clone(),
                "step": loop.step_count,
            }
    loop = TrainLoop(tiny_clip(), rank_settings("fsdp"))
    rng_before = torch.get_rng_state()
    load_checkpoint(loop, os.path.join(out_dir, "single"))
    results["from_single"] = {
        "step": loop.step_count,
        "rng_kept": torch.equal(torch.get_rng_state(), rng_before),
        "optimizer": loop.optimizer_state_dict(),
        "model": loop.model_state_dict(),
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):

    out = tmp_path_factory.mktemp("resume-two-ranks")
    single = TrainLoop(tiny_clip(), rank_settings("ddp"))  # one process: DDP settings, no wrapper
    single.step(*batch(8, seed=11))
    save_checkpoint(single, out / "single")
    run_ranks(_resume_on_rank, WORLD, out)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_resume_bit_identically_under_ddp_and_fsdp(two_rank_results, strategy):
    _, ranks = two_rank_results
    for rank, results in enumerate(ranks):
        got = results[strategy]
        assert got["got"] == got["expected"], f"rank {rank}"
        assert got["resumed"]["step"] == got["straight"]["step"] == 3
        assert torch.equal(got["resumed"]["bias"], got["straight"]["bias"])
    straight, resumed = ranks[0][strategy]["straight"], ranks[0][strategy]["resumed"]
    assert straight["model"].keys() == resumed["model"].keys() and "visual.proj" in straight["model"]
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    want, have = straight["optimizer"], resumed["optimizer"]
    # torch's FSDP state-dict loader hands `betas` back as a list (AdamW unpacks either).
    assert [{**g, "betas": tuple(g["betas"])} for g in have["param_groups"]] == want["param_groups"]
    assert have["state"].keys() == want["state"].keys()
    for param, values in want["state"].items():
        for key, value in values.items():
            assert torch.equal(have["state"][param][key], value), (param, key)


def test_fsdp_checkpoint_is_sharded_and_resumes_in_one_process_without_the_ranks_random_states(two_rank_results):
    out, ranks = two_rank_results
    assert len(list((out / "fsdp" / "shards").glob("*.safetensors"))) == WORLD  # each rank wrote its own
    assert not (out / "fsdp" / "model.safetensors").exists()
    torch.manual_seed(3)
    loop = TrainLoop(create_model("ViT-Tiny"), rank_settings("fsdp"))  # one process: FSDP does not apply
    rng_before = torch.get_rng_state()
    load_checkpoint(loop, out / "fsdp")
    assert loop.step_count == 1 and torch.equal(torch.get_rng_state(), rng_before)
    saved = ranks[0]["fsdp"]["saved"]  # what the two ranks held when they saved, gathered
    names = dict(zip(map(id, loop.module.parameters()), (n for n, _ in loop.module.named_parameters())))
    state = loop.optimizer.state
    assert len(state) == len(list(loop.module.parameters())) == len(saved["optimizer"]["state"])
    for param, values in state.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(values[key], saved["optimizer"]["state"][names[id(param)]][key]), (param, key)
    for name, value in saved["model"].items():
        assert torch.equal(loop.module.clip.state_dict()[name], value), name


def test_one_process_checkpoint_resumes_under_fsdp_on_two_ranks(two_rank_results):
    out, ranks = two_rank_results
    saved = load_file(out / "single" / TENSORS_FILE)
    for results in ranks:
        assert results["from_single"]["step"] == 1 and results["from_single"]["rng_kept"]
    state = ranks[0]["from_single"]["optimizer"]["state"]
    assert {f"optimizer/{name}/exp_avg" for name in state} == {k for k in saved if k.endswith("/exp_avg")}
    for name, values in state.items():
        for key, value in values.items():
            assert torch.equal(value, saved[f"optimizer/{name}/{key}"]), (name, key)
    for name, value in load_model(out / "single").state_dict().items():
        assert torch.equal(ranks[0]["from_single"]["model"][name], value), name
