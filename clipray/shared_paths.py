"""On a Ray cluster of more than one node, every path a job reads or writes must be one that every
node sees: a task or a Train worker on another node would otherwise read a folder that is not
there, or write checkpoints and shards onto its own disk where the next stage never finds them.

`check_shared_paths(cfg, command, nodes)` refuses, before any work, the local paths of the command's
keys (`KEYS`) when `nodes > 1`, naming each key, unless `ray.shared_filesystem: true` says the local
paths lie on a mount shared by every node (NFS, a FUSE bucket, a KubeRay volume).
"""

from __future__ import annotations

from typing import Any

from storage import is_local

_TRAIN = ("train.data", "train.val_data", "train.zeroshot_data", "train.storage_path")
# The paths each command reads or writes on the cluster's nodes.
KEYS: dict[str, tuple[str, ...]] = {
    "pipeline": ("data.input", "data.local_root", "data.output"),
    "train": _TRAIN,
    "tune": _TRAIN + ("tune.storage_path",),
    "eval": ("eval.dataset", "eval.train_dataset", "eval.val_dataset", "eval.data_root", "eval.output"),
}


def local_paths(cfg: Any, command: str) -> list[tuple[str, str]]:
    """(key, path) for every local path among the command's keys, in `KEYS` order."""
    found = []
    for key in KEYS[command]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            path = item if isinstance(item, str) else getattr(item, "path", None)  # entries with a path
            if path and is_local(path):
                found.append((key, path))
    return found


def check_shared_paths(cfg: Any, command: str, nodes: int) -> None:
    """Raise `clipray.config.ConfigError` naming each local path of `command` when the cluster has
    more than one node and `ray.shared_filesystem` is false."""
    from clipray.config import ConfigError

    if nodes <= 1 or cfg.ray.shared_filesystem:
        return
    found = local_paths(cfg, command)
    if found:
        listed = "; ".join(f"{key} = {path!r}" for key, path in found)
        raise ConfigError(
            f"the Ray cluster has {nodes} nodes, and these local paths would be read or written on "
            f"each node's own disk: {listed}. Use storage every node reaches (s3://, gs://, ...), or "
            "set ray.shared_filesystem: true if these paths lie on a filesystem mounted on every node"
        )


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))
