"""Checkpoints without pickle: a resumed loop continues bit-identically to an uninterrupted one (one
process, SigLIP with accumulation, the fp16 scaler; DDP and FSDP on 2 gloo ranks; across a world-size
change), and a planted pickle or a tampered trainer state is refused before anything is loaded."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tests.support.gloo import run_ranks
from tests.test_loop import WORLD, batch, tiny_clip
from training.loop import LoopSettings, TrainLoop
from training.model import CheckpointError, create_model, load_model
from training.trainer_state import JSON_FILE, TENSORS_FILE, load_checkpoint, save_checkpoint

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


# --------------------------------------------------------------------------------- what is on disk
def test_checkpoint_holds_safetensors_and_json_and_loads_with_no_unpickling(tmp_path, monkeypatch):
    loop = TrainLoop(tiny_clip(), SETTINGS["siglip-accumulated"])
    loop.step(*batch(4))
    save_checkpoint(loop, tmp_path, extra={"data": {"step": 1}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors", "model_config.json", JSON_FILE, TENSORS_FILE]
    doc = json.loads((tmp_path / JSON_FILE).read_text())
    assert (doc["format"], doc["version"], doc["step"], doc["world_size"]) == ("clipray.trainer_state", 1, 1, 1)
    assert doc["extra"] == {"data": {"step": 1}} and doc["logit_bias"] is True
    assert doc["optimizer"]["param_groups"][1]["params"][0] == "logit_bias"
    tensors = load_file(tmp_path / TENSORS_FILE)
    assert tensors["rng/0/torch"].dtype == torch.uint8 and tensors["rng/0/numpy"].shape == (624,)
    assert tensors["optimizer/clip.visual.proj/exp_avg"].shape == loop.module.clip.visual.proj.shape
    assert torch.equal(load_model(tmp_path).visual.proj, loop.module.clip.visual.proj.detach())

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, attr, refuse)
    resumed = TrainLoop(create_model("ViT-Tiny"), SETTINGS["siglip-accumulated"])
    assert load_checkpoint(resumed, tmp_path) == {"data": {"step": 1}}
    assert resumed.step_count == 1


class CreatesFile:
    """Unpickling this runs `open(path, "w")`: the shape of any code-running payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def planted(tmp_path):
    """A valid checkpoint whose trainer state was replaced by a malicious old-style trainer_state.pt."""
    loop = TrainLoop(tiny_clip(), SETTINGS["clip"])
    loop.step(*batch(4))
    save_checkpoint(loop, tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": CreatesFile(marker), "step": 1}, tmp_path / "ckpt" / "trainer_state.pt")
    # The payload is live: loading it the way older clipray did runs it.
    shutil.copy(tmp_path / "ckpt" / "trainer_state.pt", tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return tmp_path / "ckpt", marker


def test_old_pickled_trainer_state_is_refused_unread_with_what_to_do(planted):
    ckpt, marker = planted
    (ckpt / TENSORS_FILE).unlink()
    (ckpt / JSON_FILE).unlink()
    loop = TrainLoop(create_model("ViT-Tiny"), SETTINGS["clip"])
    before = {n: p.detach().clone() for n, p in loop.module.named_parameters()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(loop, ckpt)
    message = str(err.value)
    assert f"{ckpt / 'trainer_state.pt'} is a pickle written by an older clipray" in message
    assert "unpickling a file runs whatever code the file names" in message
    assert "start fresh under another train.name" in message
    assert f"a run under another train.name with model.pretrained={ckpt / 'model.safetensors'}" in message
    assert not marker.exists()
    assert all(torch.equal(p, before[n]) for n, p in loop.module.named_parameters()) and loop.step_count == 0


def test_old_pickle_beside_a_valid_new_state_is_never_opened(planted):
    ckpt, marker = planted
    loop = TrainLoop(create_model("ViT-Tiny"), SETTINGS["clip"])
    load_checkpoint(loop, ckpt)
    assert loop.step_count == 1 and not marker.exists()


def test_a_folder_without_the_trainer_state_names_what_is_missing(tmp_path):
    loop = TrainLoop(tiny_clip(), SETTINGS["clip"])
    save_checkpoint(loop, tmp_path)
    (tmp_path / JSON_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path} has no {JSON_FILE}; it was not written by"):
        load_checkpoint(loop, tmp_path)


# --------------------------------------------------------------------------------- tampered state
def _drop(mapping, key):
    del mapping[key]


JSON_TAMPERING = {
    "not an object": (lambda doc: [doc], "the document is a list, expected a JSON object"),
    "unknown version": (lambda doc: doc.update(version=2),
                        "version 2 is not a trainer-state format version this clipray reads \\(it reads 1\\)"),
    "other format": (lambda doc: doc.update(format="torch"), "format is 'torch', expected 'clipray.trainer_state'"),
    "missing key": (lambda doc: _drop(doc, "samples_seen"), "the document has no key 'samples_seen'"),
    "unknown key": (lambda doc: doc.update(code="import os"), "the document has an unknown key 'code'"),
    "step as text": (lambda doc: doc.update(step="1"), "step is '1', expected an integer >= 0"),
    "lr as text": (lambda doc: doc["optimizer"]["param_groups"][0].update(lr="0.1"),
                   "optimizer.param_groups\\[0\\].lr is a string, expected a number"),
    "renamed parameter": (lambda doc: doc["optimizer"]["param_groups"][0]["params"].__setitem__(0, "clip.evil"),
                          "optimizer.param_groups\\[0\\].params are not the model's \\d+ parameters "
                          "\\(#0 is 'clip.evil', the model's is 'clip.text_projection'\\)"),
    "state of an unknown parameter": (lambda doc: doc["optimizer"]["with_state"].append("clip.evil"),
                                      "optimizer.with_state is not a list of distinct parameter names"),
    "scheduler key missing": (lambda doc: _drop(doc["scheduler"], "last_epoch"),
                              "scheduler has no key 'last_epoch'"),
    "scheduler attribute added": (lambda doc: doc["scheduler"]["lr_lambdas"][0].update(__class__="x"),
                                  "scheduler.lr_lambdas\\[0\\] has an unknown key '__class__'"),
    "rng of another world": (lambda doc: doc["rng"].append(doc["rng"][0]),
                             "rng is a list, expected a list of 1 \\(one per rank\\)"),
    "python rng version": (lambda doc: doc["rng"][0]["python"].update(version=2),
                           "rng\\[0\\].python.version is 2, expected an integer from 3 to 3"),
    "extra not an object": (lambda doc: doc.update(extra=[1]), "extra is a list, expected an object"),
    "bias flag": (lambda doc: doc.update(logit_bias=False),
                  "logit_bias is false, but this loop has a SigLIP bias \\(train.loss changed\\?\\)"),
}


def _rewrite(tensors, **changes):
    tensors = dict(tensors)
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


TENSOR_TAMPERING = {
    "moment in float64": (lambda t: _rewrite(t, **{"optimizer/clip.visual.proj/exp_avg":
                                                   t["optimizer/clip.visual.proj/exp_avg"].double()}),
                          "tensor 'optimizer/clip.visual.proj/exp_avg' is torch.float64 \\[128, 128\\], "
                          "expected torch.float32 \\[128, 128\\]"),
    "moment of another shape": (lambda t: _rewrite(t, **{"optimizer/clip.visual.proj/exp_avg_sq": torch.zeros(3)}),
                                "tensor 'optimizer/clip.visual.proj/exp_avg_sq' is torch.float32 \\[3\\]"),
    "missing rng": (lambda t: _rewrite(t, **{"rng/0/torch": None}), "has no tensor 'rng/0/torch'"),
    "short rng": (lambda t: _rewrite(t, **{"rng/0/torch": t["rng/0/torch"][:100].clone()}),
                  "tensor 'rng/0/torch' is torch.uint8 \\[100\\], expected torch.uint8 \\[5056\\]"),
    "rng word out of range": (lambda t: _rewrite(t, **{"rng/0/numpy": t["rng/0/numpy"] + 2 ** 32}),
                              "tensor 'rng/0/numpy' holds values outside \\[0, 4294967295\\]"),
    "python rng index": (lambda t: _rewrite(t, **{"rng/0/python": torch.cat([t["rng/0/python"][:-1],
                                                                             torch.tensor([700])])}),
                         "tensor 'rng/0/python' ends in index 700, expected at most 624"),
    "bias as a vector": (lambda t: _rewrite(t, logit_bias=torch.zeros(2)),
                         "tensor 'logit_bias' is torch.float32 \\[2\\], expected torch.float32 \\[\\]"),
    "extra tensor": (lambda t: _rewrite(t, payload=torch.zeros(1)), "holds 1 unexpected tensors \\(payload\\)"),
}


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip-ckpt")
    loop = TrainLoop(tiny_clip(), SETTINGS["siglip-accumulated"])
    loop.step(*batch(4))
    save_checkpoint(loop, folder)
    return folder


def _refused(folder, file: str, pattern: str) -> None:
    """load_checkpoint raises naming `file` and matching `pattern`, and leaves the loop as built."""
    loop = TrainLoop(tiny_clip(), SETTINGS["siglip-accumulated"])
    before = {n: p.detach().clone() for n, p in loop.module.named_parameters()}
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_checkpoint(loop, folder)
    assert str(err.value).startswith(f"{folder / file}: ") and "the checkpoint is not loaded" in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in loop.module.named_parameters())
    assert loop.step_count == 0 and not loop.optimizer.state


@pytest.mark.parametrize("case", sorted(JSON_TAMPERING))
def test_tampered_trainer_state_json_is_refused_naming_the_entry(siglip_checkpoint, tmp_path, case):
    change, pattern = JSON_TAMPERING[case]
    folder = shutil.copytree(siglip_checkpoint, tmp_path / "ckpt")
    doc = json.loads((folder / JSON_FILE).read_text())
    doc = change(doc) or doc
    (folder / JSON_FILE).write_text(json.dumps(doc))
    _refused(folder, JSON_FILE, pattern)


@pytest.mark.parametrize("case", sorted(TENSOR_TAMPERING))
def test_tampered_trainer_state_tensors_are_refused_naming_the_tensor(siglip_checkpoint, tmp_path, case):
    change, pattern = TENSOR_TAMPERING[case]
    folder = shutil.copytree(siglip_checkpoint, tmp_path / "ckpt")
    save_file(change(load_file(folder / TENSORS_FILE)), folder / TENSORS_FILE)
    _refused(folder, TENSORS_FILE, pattern)


@pytest.mark.parametrize("file, content, pattern", [
    (JSON_FILE, b"{\"format\": ", "is not valid JSON"),
    (TENSORS_FILE, pickle.dumps(CreatesFile("/nonexistent/never")), "is not a readable safetensors file"),
])
def test_unreadable_trainer_state_files_are_refused(siglip_checkpoint, tmp_path, file, content, pattern):
    folder = shutil.copytree(siglip_checkpoint, tmp_path / "ckpt")
    (folder / file).write_bytes(content)
    _refused(folder, file, pattern)


def test_fp16_resume_of_a_state_saved_without_the_grad_scaler_is_refused(tmp_path):
    save_checkpoint(TrainLoop(tiny_clip(), SETTINGS["clip"]), tmp_path)
    fp16 = TrainLoop(tiny_clip(), LoopSettings(total_steps=8, precision="amp_fp16"))
    with pytest.raises(CheckpointError, match="scaler is empty: the run was saved without the fp16 grad scaler"):
        load_checkpoint(fp16, tmp_path)


# --------------------------------------------------------------------------------- two ranks on gloo
def rank_settings(strategy: str) -> LoopSettings:
    return LoopSettings(total_steps=8, lr=1e-3, warmup=1, loss="siglip", micro_batch_size=2, strategy=strategy)


def _resume_on_rank(rank: int, out_dir: str) -> None:
    """Per strategy: 3 steps straight vs 1 step, save, load into other weights, 2 steps; then the
    one-process checkpoint loaded under FSDP. Writes what the parent compares to rank{rank}.pt."""
    torch.set_num_threads(1)
    data = [tuple(t[rank * 4:(rank + 1) * 4] for t in batch(8, seed=s)) for s in range(3)]
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
        dist.barrier()  # rank 0 has written it
        seed_everything(999 + rank)
        resumed = TrainLoop(create_model("ViT-Tiny", patch_dropout=0.5), rank_settings(strategy))
        load_checkpoint(resumed, folder)
        results[strategy] = {"expected": expected[1:], "got": run_steps(resumed, data[1:])}
        for name, loop in (("straight", straight), ("resumed", resumed)):  # full on rank 0 under FSDP
            results[strategy][name] = {"model": loop.model_state_dict(), "optimizer": loop.optimizer_state_dict(),
                                       "bias": loop.module.logit_bias.detach().clone(), "step": loop.step_count}
    loop = TrainLoop(tiny_clip(), rank_settings("fsdp"))
    rng_before = torch.get_rng_state()
    load_checkpoint(loop, os.path.join(out_dir, "single"))
    results["from_single"] = {"step": loop.step_count, "rng_kept": torch.equal(torch.get_rng_state(), rng_before),
                              "optimizer": loop.optimizer_state_dict(), "model": loop.model_state_dict()}
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


def test_fsdp_checkpoint_resumes_in_one_process_without_the_ranks_random_states(two_rank_results):
    out, _ = two_rank_results
    torch.manual_seed(3)
    loop = TrainLoop(create_model("ViT-Tiny"), rank_settings("fsdp"))  # one process: FSDP does not apply
    rng_before = torch.get_rng_state()
    load_checkpoint(loop, out / "fsdp")
    assert loop.step_count == 1 and torch.equal(torch.get_rng_state(), rng_before)
    saved = load_file(out / "fsdp" / TENSORS_FILE)
    names = dict(zip(map(id, loop.module.parameters()), (n for n, _ in loop.module.named_parameters())))
    state = loop.optimizer.state
    assert len(state) == len(list(loop.module.parameters()))
    for param, values in state.items():
        assert torch.equal(values["exp_avg"], saved[f"optimizer/{names[id(param)]}/exp_avg"])
    for name, value in load_model(out / "fsdp").state_dict().items():
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


def test_extra_that_is_not_a_json_object_is_refused_before_anything_is_written(tmp_path):
    loop = TrainLoop(tiny_clip(), SETTINGS["clip"])
    with pytest.raises(TypeError, match="extra must be a JSON object .*: it is a list"):
        save_checkpoint(loop, tmp_path / "a", extra=[1])
    with pytest.raises(TypeError, match="extra must be a JSON object .*not JSON serializable"):
        save_checkpoint(loop, tmp_path / "b", extra={"position": object()})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_driver_refuses_a_legacy_checkpoint_before_any_worker_starts(tmp_path):
    """`clipray train` over a run folder whose latest checkpoint is an old pickle stops in the
    driver with the refusal (naming where the checkpoint lives), before Ray Train starts."""
    import pickle

    from storage import Folder
    from training.driver import refuse_legacy_checkpoint
    from training.model import CheckpointError

    run = tmp_path / "runs" / "old"
    (run / "checkpoint_000000010").mkdir(parents=True)
    (run / "checkpoint_000000010" / "trainer_state.pt").write_bytes(pickle.dumps({"step": 10}))
    (run / "checkpoint_000000020").mkdir()
    (run / "checkpoint_000000020" / "trainer_state.pt").write_bytes(pickle.dumps({"step": 20}))
    with pytest.raises(CheckpointError, match=r"checkpoint_000000020/trainer_state.pt is a pickle .* not loaded"):
        refuse_legacy_checkpoint(Folder(str(run)))
    (run / "checkpoint_000000020" / "trainer_state.json").write_text("{}")  # a new-format checkpoint is left to the workers
    refuse_legacy_checkpoint(Folder(str(run)))
    refuse_legacy_checkpoint(Folder(str(tmp_path / "runs" / "new")))  # no run folder yet: nothing to refuse
