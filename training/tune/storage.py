"""The sweep folder `{tune.storage_path}/{tune.name}`, local or on S3 (or any pyarrow filesystem).

Resolved the way the training runner resolves its own storage (`training.train.resolve_storage`:
the same S3 endpoint from `train.s3_endpoint_url` or AWS_ENDPOINT_URL), so that Ray Tune's state,
the trials' Ray Train runs under `runs/` and our result files all live on one filesystem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from training.config import TrainConfig, TuneConfig

RUNS_DIR = "runs"


@dataclass(frozen=True)
class SweepStorage:
    uri: str  # the sweep folder for people and for train.storage_path: /abs/path or s3://bucket/...
    filesystem: Any  # pyarrow filesystem
    root_fs_path: str  # tune.storage_path inside the filesystem (what Ray Tune's RunConfig takes)
    fs_path: str  # the sweep folder inside the filesystem
    local: bool

    @property
    def runs_uri(self) -> str:
        """Where the trials' Ray Train runs go (their train.storage_path)."""
        return f"{self.uri}/{RUNS_DIR}"

    def path(self, relative: str) -> str:
        return f"{self.fs_path}/{relative}"

    def write(self, relative: str, data: bytes) -> str:
        """Write a file (atomically on a local disk); returns its URI."""
        target = self.path(relative)
        parent = target.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        if self.local:
            tmp = f"{target}.tmp-{os.getpid()}"
            with self.filesystem.open_output_stream(tmp) as fh:
                fh.write(data)
            self.filesystem.move(tmp, target)
        else:
            with self.filesystem.open_output_stream(target) as fh:
                fh.write(data)
        return f"{self.uri}/{relative}"

    def read_text(self, relative: str) -> Optional[str]:
        """The file's text, or None when it does not exist."""
        if not self.exists(relative):
            return None
        with self.filesystem.open_input_stream(self.path(relative)) as fh:
            return fh.read().decode()

    def exists(self, relative: str) -> bool:
        from pyarrow import fs as pafs

        return self.filesystem.get_file_info(self.path(relative)).type != pafs.FileType.NotFound


def sweep_storage(tune: TuneConfig, train: TrainConfig) -> SweepStorage:
    from training.train import resolve_storage

    storage = resolve_storage(train.model_copy(update={"storage_path": tune.storage_path, "name": tune.name}))
    return SweepStorage(uri=storage.uri, filesystem=storage.filesystem, root_fs_path=storage.root_fs_path,
                        fs_path=storage.fs_path, local=storage.local)
