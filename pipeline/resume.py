"""What makes a run resumable: a fixed plan of input shards, and one commit marker per unit of work.

The plan (`_state/plan.json`) splits the input into shards of `data.rows_per_shard` consecutive rows
of one input file, numbered in (sorted file, row) order, so the same input always gives the same
shards and the same keys (`{shard}{row}`, e.g. `000120042` = shard 12, row 42 of it). Input files
are first copied into small Arrow files under `_work/input/` ("staging"): reading shard 9,000 of a
12M-row file must not mean reading the file from the top, and CSV/JSON have no row index.

Each phase commits a shard by writing its marker JSON (`_state/<phase>/<shard>.json`) LAST, after
the shard's data files. A rerun skips shards with a marker and redoes the others after deleting
whatever they had half written. On a local disk files are renamed into place; on object stores an
object appears whole or not at all. The manifest is assembled from the markers alone.

A plan is bound to the config that made it (`fingerprint`): resuming with a config that would
produce different rows stops with a message naming the keys that changed. The plan holds no
credentials: URLs in it (the input's, each file's) lose their userinfo and secret query values
(`storage.redact`), so a password changed between a run and its resume is no change.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import base64
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from pipeline.config import DataConfig
from storage import Folder
from storage.redact import redact_config, redact_text

PLAN = "_state/plan.json"
STAGING = "_work/input"
PLAN_VERSION = 3  # 2: staged rows carry source_error, pair dedup first; 3: 16-bit/palette PNGs decoded to their pixels

# Config keys that change which rows are accepted or what is stored. The others (timeouts,
# retries, threads, actors, progress, credentials) may change between a run and its resume.
FINGERPRINT_KEYS = (
    "input",
    "input_format",
    "columns",
    "url_col",
    "caption_col",
    "extra_cols",
    "rows_per_shard",
    "output_format",
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "upscale_interpolation",
    "downscale_interpolation",
    "encode_format",
    "encode_quality",
    "min_image_size",
    "max_image_area",
    "max_pixels",
    "max_decoded_bytes",
    "fast_jpeg_decode",
    "allow_private_addresses",
    "local_root",
    "disallowed_header_directives",
    "user_agent_token",
    "max_redirects",
    "max_response_bytes",
    "filters",
    "verify_hash",
    "bbox_col",
)


# Keys added after output folders already existed, left out of the fingerprint at their default so
# that such a folder still resumes: (path, default).
LATER_KEYS = ((("output_format",), "parquet"), (("local_root",), None), (("filters", "columns"), []))


def fingerprint(data: DataConfig) -> dict[str, Any]:
    """The FINGERPRINT_KEYS of `data`, credentials redacted (the fingerprint is stored in the plan)."""
    dumped = data.model_dump(mode="json")
    found = {k: dumped[k] for k in FINGERPRINT_KEYS}
    for path, default in LATER_KEYS:
        parent = found
        for name in path[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(path[-1], default) == default:
            parent.pop(path[-1], None)
    return redact_config(found)


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "data") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += fingerprint_changes(a, b, f"{prefix}.{key}")
        elif a != b:
            changes.append(redact_text(f"{prefix}.{key}: {a!r} -> {b!r}"))
    return changes


# --- phases and their file names

DOWNLOAD, SCORE, GLOBAL = "download", "score", "global"


def marker(phase: str, shard: "ShardSpec") -> str:
    return f"_state/{phase}/{shard.name}.json"


def committed(out: Folder, phase: str) -> set[str]:
    """Names of the shards committed in `phase`."""
    return {n.rsplit("/", 1)[-1][: -len(".json")] for n in out.list(f"_state/{phase}", ".json")}


def markers(out: Folder, phase: str, shards: list["ShardSpec"]) -> dict[str, dict]:
    """Stats of the committed shards of `phase` among `shards`, by shard name."""
    wanted = {s.name: s for s in shards}
    names = [n for n in out.list(f"_state/{phase}", ".json") if n.rsplit("/", 1)[-1][:-5] in wanted]
    with ThreadPoolExecutor(16) as pool:
        stats = list(pool.map(out.read_json, names))
    return {s["shard"]: s for s in stats}


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: `rows` input rows staged in `input` (an Arrow file under the output)."""

    id: int
    name: str  # zero-padded id, also the key prefix
    input: str
    rows: int
    source: str  # the input file the rows came from
    first_row: int  # index of the shard's first row in that file
    row_digits: int
    global_pass: bool  # accepted rows wait in _work/ for dedup / CLIP-score / the tar writer before shards/
    output_format: str = "parquet"  # of shards/: parquet, or webdataset (written by the global pass)

    def key(self, row: int) -> str:
        return f"{self.name}{row:0{self.row_digits}d}"

    # outputs of the download phase
    @property
    def accepted_file(self) -> str:
        return f"_work/download/{self.name}.parquet" if self.global_pass else f"shards/{self.name}.parquet"

    @property
    def rejects_file(self) -> str:
        return f"rejects/{self.name}.parquet"

    @property
    def index_file(self) -> str:
        return f"_work/index/{self.name}.parquet"

    # outputs of the score and global phases
    @property
    def score_file(self) -> str:
        return f"_work/score/{self.name}.parquet"

    @property
    def final_file(self) -> str:
        return f"shards/{self.name}.tar" if self.output_format == "webdataset" else f"shards/{self.name}.parquet"

    @property
    def global_rejects_file(self) -> str:
        return f"rejects/{self.name}-global.parquet"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ShardSpec":
        return ShardSpec(**d)


@dataclass
class Plan:
    fingerprint: dict[str, Any]
    files: list[dict[str, Any]]  # {url, format, rows}
    shards: list[ShardSpec]
    extra_schema: pa.Schema

    @property
    def input_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "fingerprint": self.fingerprint,
            "files": self.files,
            "extra_schema": base64.b64encode(self.extra_schema.serialize().to_pybytes()).decode(),
            "shards": [s.to_dict() for s in self.shards],
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(
                f"{PLAN} has version {d.get('version')}, this pipeline writes {PLAN_VERSION}: the run "
                "was started by another version of clipray; finish it with that version, or use "
                "a new data.output"
            )
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(d["extra_schema"])))
        return Plan(d["fingerprint"], d["files"], [ShardSpec.from_dict(s) for s in d["shards"]], schema)


def make_plan(data: DataConfig, staged: list[dict[str, Any]]) -> Plan:
    """The plan from the staging results, in input-file order.

    staged: per input file `{url, format, rows, chunks: [{name, rows}], schema: pa.Schema}`.
    """
    total_chunks = sum(len(f["chunks"]) for f in staged)
    shard_digits = max(5, len(str(max(0, total_chunks - 1))))
    row_digits = len(str(data.rows_per_shard - 1))
    schemas = [f["schema"] for f in staged if f["rows"]]
    try:
        extra = pa.unify_schemas(schemas) if schemas else pa.schema([])
    except pa.ArrowInvalid as exc:
        raise ValueError(f"data.extra_cols have different types in different input files: {exc}") from None
    shards = []
    for f in staged:
        source = redact_text(f["url"])
        first = 0
        for chunk in f["chunks"]:
            sid = len(shards)
            shards.append(
                ShardSpec(
                    id=sid,
                    name=f"{sid:0{shard_digits}d}",
                    input=chunk["name"],
                    rows=chunk["rows"],
                    source=source,
                    first_row=first,
                    row_digits=row_digits,
                    global_pass=data.needs_global_pass,
                    output_format=data.output_format,
                )
            )
            first += chunk["rows"]
    files = [{"url": redact_text(f["url"]), "format": f["format"], "rows": f["rows"]} for f in staged]
    return Plan(fingerprint(data), files, shards, extra)


def load_plan(out: Folder, data: DataConfig) -> Optional[Plan]:
    """The committed plan of a previous run in this output folder, checked against `data`."""
    if not out.exists(PLAN):
        return None
    plan = Plan.from_json(out.read_json(PLAN))
    # (redacted again: a plan written before plans were redacted may hold credentials)
    changes = fingerprint_changes(redact_config(plan.fingerprint), fingerprint(data))
    if changes:
        raise ValueError(
            f"data.output {out.url} holds a run made with a different config, so it cannot be resumed:\n  "
            + "\n  ".join(changes)
            + "\nUse a new data.output, or delete the old one to start over."
        )
    return plan
