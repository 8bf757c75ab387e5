"""`manifest.json`: the run's account of every input row, assembled from the shards' commit markers.

Invariant (checked before writing): `accepted + rejected == input_rows`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from pipeline.config import DataConfig
from pipeline.reasons import STAGES
from storage.redact import redact_config

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def redacted_config(data: DataConfig) -> dict[str, Any]:
    """The data config as JSON without credentials (`storage.redact.redact_config`)."""
    return redact_config(data.model_dump(mode="json"))


class InvariantError(RuntimeError):
    """accepted + rejected != input_rows: a bug, never a property of the input."""


def build_manifest(
    data: DataConfig,
    shards: list[dict[str, Any]],
    download: dict[str, dict[str, Any]],
    global_: Optional[dict[str, dict[str, Any]]],
    duration_s: float,
    run: dict[str, Any],
) -> dict[str, Any]:
    """shards: the plan's shard specs (dicts, plan order); download/global_: marker stats by shard name."""
    input_rows = accepted = rejected = 0
    reasons: Counter = Counter()
    stages: Counter = Counter()
    files = []
    rejects = []
    for spec in shards:
        name = spec["name"]
        d = download[name]
        if d["rows"] != spec["rows"]:
            raise InvariantError(f"shard {name}: marker says {d['rows']} rows, the plan {spec['rows']}")
        input_rows += d["rows"]
        rejected += d["rejected"]
        reasons.update(d["reasons"])
        stages.update(d["stages"])
        if d.get("rejects_file"):
            rejects.append({"path": d["rejects_file"], "rows": d["rejected"]})
        if global_ is None:
            accepted += d["accepted"]
            if d.get("accepted_file"):
                files.append({"path": d["accepted_file"], "rows": d["accepted"], "bytes": d["accepted_bytes"]})
            continue
        g = global_[name]
        if g["accepted"] + g["rejected"] != d["accepted"]:
            raise InvariantError(
                f"shard {name}: global pass kept {g['accepted']} + rejected {g['rejected']} "
                f"of {d['accepted']} downloaded rows"
            )
        accepted += g["accepted"]
        rejected += g["rejected"]
        reasons.update(g["reasons"])
        stages.update(g["stages"])
        if g.get("final_file"):
            files.append({"path": g["final_file"], "rows": g["accepted"], "bytes": g["final_bytes"]})
        if g.get("rejects_file"):
            rejects.append({"path": g["rejects_file"], "rows": g["rejected"]})
    if accepted + rejected != input_rows:
        raise InvariantError(f"accepted {accepted} + rejected {rejected} != input_rows {input_rows}")
    return {
        "version": MANIFEST_VERSION,
        "input_rows": input_rows,
        "accepted": accepted,
        "rejected": rejected,
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "stages": {s: stages.get(s, 0) for s in STAGES if stages.get(s)},
        "shards": files,
        "rejects": rejects,
        "duration_s": round(duration_s, 3),
        "run": run,
        "config": redacted_config(data),
    }


def summary(manifest: dict[str, Any]) -> str:
    """The closing summary printed after a run."""
    run = manifest["run"]
    lines = [
        f"pipeline: {manifest['input_rows']} rows in, {manifest['accepted']} accepted, "
        f"{manifest['rejected']} rejected, {len(manifest['shards'])} shard files"
        f" ({manifest['duration_s']:.1f}s, {run.get('images_per_s', 0):.1f} images/s this run"
        f"{', resumed: ' + str(run['shards_already_done']) + ' shards were already done' if run.get('shards_already_done') else ''})",
    ]
    if run.get("retry_round"):
        lines.append(
            f"retry round {run['retry_round']}: {run['rows_processed']} rows rejected for a transient reason "
            f"were tried again, {run['images_downloaded']} of them are now accepted"
        )
    if manifest["reasons"]:
        lines.append("rejected by reason:")
        width = max(len(r) for r in manifest["reasons"])
        for reason, n in manifest["reasons"].items():
            share = n / manifest["input_rows"] if manifest["input_rows"] else 0
            lines.append(f"  {reason:<{width}}  {n:>9}  {share:6.1%}")
    return "\n".join(lines)
