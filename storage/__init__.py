"""The storage layer every stage uses, at the bottom of the dependency order (it imports no stage).

- `StorageConfig`: the storage keys each config section inherits (`storage_options`,
  `s3_endpoint_url`, `s3_region`); credentials only from the standard AWS provider chain.
- `fsspec_filesystem` / `pyarrow_filesystem` / `open_file`: a URI to a configured filesystem.
- `Folder`: a root folder and the files under it, with atomic writes (`atomic_write`) and names
  checked to stay inside; `write_file` / `read_file` for one file by its URI; `ParquetSink` for
  Parquet written in pieces.
- `FolderLock`: one run at a time per output folder.
- `redact_config` / `redact_text` / `redact_userinfo`: credentials out of everything written or
  printed (config dumps, logs, messages; URL userinfo also out of stored URLs).
"""

from storage.config import STORAGE_FIELDS, StorageConfig
from storage.filesystems import (
    absolute,
    configured_s3_endpoint,
    fsspec_filesystem,
    fsspec_options,
    is_local,
    join,
    open_file,
    protocol_of,
    pyarrow_filesystem,
)
from storage.folder import Folder, atomic_local_write, atomic_write, is_temporary, read_file, safe_relative, write_file
from storage.lock import FolderInUse, FolderLock
from storage.parquet import ParquetSink, parquet_options
from storage.redact import redact_config, redact_text, redact_userinfo

__all__ = [
    "STORAGE_FIELDS",
    "StorageConfig",
    "absolute",
    "configured_s3_endpoint",
    "fsspec_filesystem",
    "fsspec_options",
    "is_local",
    "join",
    "open_file",
    "protocol_of",
    "pyarrow_filesystem",
    "Folder",
    "atomic_local_write",
    "atomic_write",
    "is_temporary",
    "read_file",
    "safe_relative",
    "write_file",
    "FolderInUse",
    "FolderLock",
    "ParquetSink",
    "parquet_options",
    "redact_config",
    "redact_text",
    "redact_userinfo",
]
