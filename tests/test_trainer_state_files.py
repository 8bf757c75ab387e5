"""What a checkpoint's trainer state is on disk, and what is refused: the files are safetensors and
JSON, loaded with no unpickling; a planted pickle, a tampered or unreadable state, an `extra` that is
not JSON are refused with an error naming the file and the entry, before anything is loaded."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_loop import batch, tiny_clip
from tests.test_trainer_state import SETTINGS
from training.loop import LoopSettings, TrainLoop
from training.model import CheckpointError, create_model, load_model
from training.trainer_state import JSON_FILE, TENSORS_FILE, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------- what is on disk
def test_checkpoint_holds_safetensors_and_json_and_loads_with_no_unpickling(tmp_path, monkeypatch):
    loop = TrainLoop(tiny_clip(), SETTINGS["siglip-accumulated"])
    loop.step(*batch(4))
    save_checkpoint(loop, tmp_path, extra={"data": {"step": 1}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "model_config.json",
        JSON_FILE,
        TENSORS_FILE,
    ]
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
    "unknown version": (
        lambda doc: doc.update(version=2),
        "version 2 is not a trainer-state format version this clipray reads \\(it reads 1\\)",
    ),
    "other format": (lambda doc: doc.update(format="torch"), "format is 'torch', expected 'clipray.trainer_state'"),
    "missing key": (lambda doc: _drop(doc, "samples_seen"), "the document has no key 'samples_seen'"),
    "unknown key": (lambda doc: doc.update(code="import os"), "the document has an unknown key 'code'"),
    "step as text": (lambda doc: doc.update(step="1"), "step is '1', expected an integer >= 0"),
    "lr as text": (
        lambda doc: doc["optimizer"]["param_groups"][0].update(lr="0.1"),
        "optimizer.param_groups\\[0\\].lr is a string, expected a number",
    ),
    "renamed parameter": (
        lambda doc: doc["optimizer"]["param_groups"][0]["params"].__setitem__(0, "clip.evil"),
        "optimizer.param_groups\\[0\\].params are not the model's \\d+ parameters "
        "\\(#0 is 'clip.evil', the model's is 'clip.text_projection'\\)",
    ),
    "state of an unknown parameter": (
        lambda doc: doc["optimizer"]["with_state"].append("clip.evil"),
        "optimizer.with_state is not a list of distinct parameter names",
    ),
    "scheduler key missing": (lambda doc: _drop(doc["scheduler"], "last_epoch"), "scheduler has no key 'last_epoch'"),
    "scheduler attribute added": (
        lambda doc: doc["scheduler"]["lr_lambdas"][0].update(__class__="x"),
        "scheduler.lr_lambdas\\[0\\] has an unknown key '__class__'",
    ),
    "rng of another world": (
        lambda doc: doc["rng"].append(doc["rng"][0]),
        "rng is a list, expected a list of 1 \\(one per rank\\)",
    ),
    "python rng version": (
        lambda doc: doc["rng"][0]["python"].update(version=2),
        "rng\\[0\\].python.version is 2, expected an integer from 3 to 3",
    ),
    "extra not an object": (lambda doc: doc.update(extra=[1]), "extra is a list, expected an object"),
    "bias flag": (
        lambda doc: doc.update(logit_bias=False),
        "logit_bias is false, but this loop has a SigLIP bias \\(train.loss changed\\?\\)",
    ),
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
    "moment in float64": (
        lambda t: _rewrite(
            t, **{"optimizer/clip.visual.proj/exp_avg": t["optimizer/clip.visual.proj/exp_avg"].double()}
        ),
        "tensor 'optimizer/clip.visual.proj/exp_avg' is torch.float64 \\[128, 128\\], "
        "expected torch.float32 \\[128, 128\\]",
    ),
    "moment of another shape": (
        lambda t: _rewrite(t, **{"optimizer/clip.visual.proj/exp_avg_sq": torch.zeros(3)}),
        "tensor 'optimizer/clip.visual.proj/exp_avg_sq' is torch.float32 \\[3\\]",
    ),
    "missing rng": (lambda t: _rewrite(t, **{"rng/0/torch": None}), "has no tensor 'rng/0/torch'"),
    "short rng": (
        lambda t: _rewrite(t, **{"rng/0/torch": t["rng/0/torch"][:100].clone()}),
        "tensor 'rng/0/torch' is torch.uint8 \\[100\\], expected torch.uint8 \\[5056\\]",
    ),
    "rng word out of range": (
        lambda t: _rewrite(t, **{"rng/0/numpy": t["rng/0/numpy"] + 2**32}),
        "tensor 'rng/0/numpy' holds values outside \\[0, 4294967295\\]",
    ),
    "python rng index": (
        lambda t: _rewrite(t, **{"rng/0/python": torch.cat([t["rng/0/python"][:-1], torch.tensor([700])])}),
        "tensor 'rng/0/python' ends in index 700, expected at most 624",
    ),
    "bias as a vector": (
        lambda t: _rewrite(t, logit_bias=torch.zeros(2)),
        "tensor 'logit_bias' is torch.float32 \\[2\\], expected torch.float32 \\[\\]",
    ),
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


@pytest.mark.parametrize(
    "file, content, pattern",
    [
        (JSON_FILE, b'{"format": ', "is not valid JSON"),
        (TENSORS_FILE, pickle.dumps(CreatesFile("/nonexistent/never")), "is not a readable safetensors file"),
    ],
)
def test_unreadable_trainer_state_files_are_refused(siglip_checkpoint, tmp_path, file, content, pattern):
    folder = shutil.copytree(siglip_checkpoint, tmp_path / "ckpt")
    (folder / file).write_bytes(content)
    _refused(folder, file, pattern)


def test_fp16_resume_of_a_state_saved_without_the_grad_scaler_is_refused(tmp_path):
    save_checkpoint(TrainLoop(tiny_clip(), SETTINGS["clip"]), tmp_path)
    fp16 = TrainLoop(tiny_clip(), LoopSettings(total_steps=8, precision="amp_fp16"))
    with pytest.raises(CheckpointError, match="scaler is empty: the run was saved without the fp16 grad scaler"):
        load_checkpoint(fp16, tmp_path)


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
    (run / "checkpoint_000000020" / "trainer_state.json").write_text(
        "{}"
    )  # a new-format checkpoint is left to the workers
    refuse_legacy_checkpoint(Folder(str(run)))
    refuse_legacy_checkpoint(Folder(str(tmp_path / "runs" / "new")))  # no run folder yet: nothing to refuse
