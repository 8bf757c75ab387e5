"""TorchScript archives as OpenAI released them (`ViT-B-32.pt`), read without running their code.

Only their tensors are taken, by a restricted unpickler that rebuilds tensors and stand-ins for the
scripted modules and refuses every other global. Which tensors are parameters/buffers is read from
the archive's `code/`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch


class TorchScriptError(ValueError):
    """An archive that cannot be read; `checkpoint.load_state_dict` reports it as a CheckpointError."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptedModule:
    """Stand-in for a scripted module object: keeps its attribute dict, runs no code."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"scripted object {self.qualname} has a non-dict state")
        self.__dict__["_state"] = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`: tensors, ordered dicts and module stand-ins, nothing else."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptedModule,), {"qualname": qualname})
            return self._classes[qualname]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a TorchScript archive (only tensors are read)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in TorchScript archive")
        _, storage_type, key, _location, numel = pid
        raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
        flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
        if flat.numel() < numel:
            raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} elements, expected {numel}")
        return flat


def is_torchscript(archive: zipfile.ZipFile) -> bool:
    names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _state_names(archive: zipfile.ZipFile, prefix: str, qualname: str) -> Optional[set]:
    """Parameter and buffer names of a scripted class, from `code/` (None if not found)."""
    module, _, cls = qualname.rpartition(".")
    path = f"{prefix}code/{module.replace('.', '/')}.py"
    try:
        source = archive.read(path).decode("utf-8")
    except KeyError:
        return None
    match = re.search(
        rf"^class {re.escape(cls)}\(Module\):\n  __parameters__ = \[(.*?)\]\n"
        rf"  __buffers__ = \[(.*?)\]",
        source,
        re.MULTILINE,
    )
    if not match:
        return None
    names = re.findall(r'"([^"]+)"', match.group(1)) + re.findall(r'"([^"]+)"', match.group(2))
    return set(names)


def read_torchscript(path: Path, archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    data = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(data) != 1:
        raise TorchScriptError(f"{path}: TorchScript archive without a single data.pkl")
    prefix = data[0][: -len("data.pkl")]
    with archive.open(data[0]) as f:
        try:
            root = _TensorsOnlyUnpickler(f, archive, prefix).load()
        except pickle.UnpicklingError as e:
            raise TorchScriptError(f"{path}: {e}") from None
    out: dict[str, torch.Tensor] = {}

    def walk(obj: _ScriptedModule, name: str) -> None:
        state = obj.__dict__.get("_state", {})
        keep = _state_names(archive, prefix, obj.qualname)
        for attr, value in state.items():
            if isinstance(value, torch.Tensor):
                if keep is None or attr in keep:
                    out[name + attr] = value.clone()
            elif isinstance(value, _ScriptedModule):
                walk(value, f"{name}{attr}.")

    if not isinstance(root, _ScriptedModule):
        raise TorchScriptError(f"{path}: TorchScript archive whose root is not a module")
    walk(root, "")
    return out
