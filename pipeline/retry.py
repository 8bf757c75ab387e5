"""`data.retry_rejects`: run again, in place, the rows of a finished run that were rejected for a
transient reason (`is_transient`: timeout, connection_error, dns_error, http_429, http_5xx),
keeping every invariant of a run (`accepted + rejected == input_rows`, one row per key).

A finished run has a download marker for every shard of its plan. A retry is a numbered round,
`_state/retry.json` = `{"round": k, "completed": false}` while it runs. Each shard whose marker
counts transient rejects and is older than the round (`retry_round` < k) goes through
`ShardRetrier.process`:

1. its transient rejects are looked up in the shard's staged input (the runner stages the input
   again: a finished run has removed `_work/`); each row must still carry the url and caption of
   its reject, else the input changed and the retry stops;
2. the ordinary `ShardDownloader` processes those rows as a small shard of their own under
   `_work/retry/`;
3. the shard's files are rewritten under new names, `shards/<shard>.retry<k>.parquet` (only when
   rows were newly accepted: they join the accepted rows in key order) and
   `rejects/<shard>.retry<k>.parquet` (the rejects that stay, with the new reason and detail of
   rows that failed again);
4. the marker is rewritten with the new counts, file names and `retry_round: k` (the commit), and
   the files it no longer names are removed.

A killed retry leaves each shard as it was (old marker, old files) or retried (new marker, new
files); files no marker names are removed at the end of the next run. Rerunning with
`data.retry_rejects` resumes the round: shards already at round k are not retried again. The
manifest is removed when a round starts and written when it ends; a later `data.retry_rejects`
run starts round k + 1. No Ray here: the runner wraps `ShardRetrier` in its actor pool.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.column_filters import load_cuts
from pipeline.config import DataConfig
from pipeline.download import ROW_GROUP_ROWS, ShardDownloader
from pipeline.manifest import MANIFEST, InvariantError
from pipeline.resume import DOWNLOAD, Plan, ShardSpec, marker
from pipeline.shards import accepted_schema
from storage import Folder
from storage.redact import redact_userinfo

RETRY_STATE = "_state/retry.json"
RETRY_WORK = "_work/retry"
TRANSIENT = frozenset({"timeout", "connection_error", "dns_error", "http_429"})


def is_transient(reason: str) -> bool:
    """A reason that may not hold next time: timeouts, connection and DNS failures, HTTP 429 and 5xx."""
    return reason in TRANSIENT or (len(reason) == 8 and reason.startswith("http_5") and reason[5:].isdigit())


def transient_rejects(stats: dict[str, Any]) -> int:
    """How many of a shard's rejects (marker stats) have a transient reason."""
    return sum(n for reason, n in stats.get("reasons", {}).items() if is_transient(reason))


def check_finished(out: Folder, plan: Plan, downloads: dict[str, dict]) -> None:
    """Raise ValueError unless every shard of the run in `out` has its download marker."""
    missing = [s.name for s in plan.shards if s.name not in downloads]
    if missing:
        raise ValueError(
            f"data.retry_rejects: the run in data.output {out.url} is not finished ({len(missing)} of "
            f"{len(plan.shards)} shards not downloaded, e.g. {missing[0]}); rerun without data.retry_rejects "
            "to finish it, then retry"
        )


def current_round(out: Folder) -> int:
    """The retry round to run: the unfinished one recorded in `_state/retry.json`, or the next."""
    state = out.read_json(RETRY_STATE) if out.exists(RETRY_STATE) else None
    if state is None:
        return 1
    return int(state["round"]) if not state["completed"] else int(state["round"]) + 1


def begin_round(out: Folder, round_: int) -> None:
    """Record round `round_` as started and remove the manifest: the shards are about to change."""
    out.write_json(RETRY_STATE, {"round": round_, "completed": False})
    out.remove([MANIFEST])


def end_round(out: Folder, round_: int) -> None:
    """Record that round `round_` is complete (after its manifest is written)."""
    out.write_json(RETRY_STATE, {"round": round_, "completed": True})


def shards_to_retry(plan: Plan, downloads: dict[str, dict], round_: int) -> list[ShardSpec]:
    """The shards with transient rejects that round `round_` has not retried yet, in plan order."""
    return [
        s
        for s in plan.shards
        if downloads[s.name].get("retry_round", 0) < round_ and transient_rejects(downloads[s.name])
    ]


def _without(counts: dict[str, int], removed: list[str], added: dict[str, int]) -> dict[str, int]:
    total = Counter(counts)
    total.subtract(Counter(removed))
    total.update(added)
    return {k: n for k, n in total.items() if n > 0}


class ShardRetrier:
    """Retries the transient rejects of whole shards (see the module docstring); one per download
    actor, with the actor's `ShardDownloader` working in `_work/retry/`."""

    def __init__(self, data: DataConfig, out: Folder, extra_schema: pa.Schema, cpu_slots: Optional[int] = None):
        self.out = out
        self.work = out.child(RETRY_WORK)
        self.schema = accepted_schema(extra_schema)
        self.downloader = ShardDownloader(
            data, self.work, extra_schema, cpu_slots=cpu_slots, column_cuts=load_cuts(out)
        )

    def close(self) -> None:
        self.downloader.close()

    def process(self, spec: ShardSpec, previous: dict[str, Any], round_: int) -> dict[str, Any]:
        """Retry the transient rejects of `spec` (whose committed marker stats are `previous`),
        commit the shard again and return its new marker stats. They carry `retry`: the counts of
        this round's rows (`rows`, `accepted`, `rejected`, `reasons`)."""
        start = time.time()
        out = self.out
        rejects = out.read_parquet(previous["rejects_file"])
        transient = pa.array([is_transient(r) for r in rejects.column("reason").to_pylist()])
        retried = rejects.filter(transient)
        kept = rejects.filter(pc.invert(transient))
        rows = [int(key[len(spec.name) :]) for key in retried.column("key").to_pylist()]
        sub = self._input_rows(spec, retried, rows)

        # The rows as a shard of their own: keys {name}{i} for i < len(rows), mapped back below.
        sub_spec = ShardSpec(
            id=spec.id,
            name=spec.name,
            input=f"input/{spec.name}.arrow",
            rows=len(rows),
            source=spec.source,
            first_row=spec.first_row,
            row_digits=spec.row_digits,
            global_pass=False,
        )
        self.work.write_arrow(sub_spec.input, sub)
        done = self.downloader.process(sub_spec)
        keys = [spec.key(r) for r in rows]

        def with_shard_keys(table: pa.Table) -> pa.Table:
            sub_rows = [int(k[len(spec.name) :]) for k in table.column("key").to_pylist()]
            index = table.schema.get_field_index("key")
            return table.set_column(index, "key", pa.array([keys[i] for i in sub_rows], pa.string()))

        accepted_file, accepted_bytes = previous["accepted_file"], previous["accepted_bytes"]
        if done["accepted"]:
            fresh = with_shard_keys(self.work.read_parquet(done["accepted_file"])).cast(self.schema)
            accepted_file = f"shards/{spec.name}.retry{round_}.parquet"
            accepted_bytes = self._write_merged(previous["accepted_file"], fresh, accepted_file)
        parts = [kept]
        if done["rejects_file"]:
            parts.append(with_shard_keys(self.work.read_parquet(done["rejects_file"])).cast(kept.schema))
        remaining = pa.concat_tables(parts).sort_by("key")
        rejects_file = None
        if remaining.num_rows:
            rejects_file = f"rejects/{spec.name}.retry{round_}.parquet"
            out.write_parquet(rejects_file, remaining)

        stats = {
            **previous,
            "accepted": previous["accepted"] + done["accepted"],
            "rejected": remaining.num_rows,
            "reasons": _without(previous["reasons"], retried.column("reason").to_pylist(), done["reasons"]),
            "stages": _without(previous["stages"], retried.column("stage").to_pylist(), done["stages"]),
            "downloaded_bytes": previous["downloaded_bytes"] + done["downloaded_bytes"],
            "accepted_file": accepted_file,
            "accepted_bytes": accepted_bytes,
            "rejects_file": rejects_file,
            "retry_round": round_,
            "retry": {
                "round": round_,
                "rows": len(rows),
                "accepted": done["accepted"],
                "rejected": done["rejected"],
                "reasons": done["reasons"],
                "duration_s": round(time.time() - start, 3),
            },
        }
        if stats["accepted"] + stats["rejected"] != spec.rows:
            raise InvariantError(
                f"shard {spec.name}: retry round {round_} left {stats['accepted']} accepted + "
                f"{stats['rejected']} rejected rows of {spec.rows}"
            )
        out.write_json(marker(DOWNLOAD, spec), stats)  # the commit
        now = (accepted_file, rejects_file)
        out.remove([f for f in (previous["accepted_file"], previous["rejects_file"]) if f and f not in now])
        work_files = (sub_spec.input, done["accepted_file"], done["rejects_file"], marker(DOWNLOAD, sub_spec))
        self.work.remove([f for f in work_files if f])
        return stats

    def _input_rows(self, spec: ShardSpec, retried: pa.Table, rows: list[int]) -> pa.Table:
        """The staged input rows `rows` of `spec`, checked against their rejects (url, caption)."""
        staged = self.out.read_arrow(spec.input)
        if staged.num_rows != spec.rows:
            raise RuntimeError(f"{spec.input} has {staged.num_rows} rows, the plan says {spec.rows}")
        sub = staged.take(pa.array(rows, pa.int64()))
        pairs = zip(
            retried.column("key").to_pylist(),
            retried.column("url").to_pylist(),
            retried.column("caption").to_pylist(),
            sub.column("url").to_pylist(),
            sub.column("caption").to_pylist(),
        )
        for key, url, caption, staged_url, staged_caption in pairs:
            if redact_userinfo(staged_url or "") != redact_userinfo(url or "") or staged_caption != caption:
                raise RuntimeError(
                    f"data.retry_rejects: row {key} of {spec.source} is no longer the row that was rejected "
                    f"(url {redact_userinfo(url or '')!r}, now {redact_userinfo(staged_url or '')!r}): data.input "
                    "changed since the run; retry in place needs the input the run was made from"
                )
        return sub

    def _write_merged(self, old_file: Optional[str], fresh: pa.Table, name: str) -> int:
        """Write the accepted rows of `old_file` and `fresh` (each in key order) to `name` in key
        order, a row group at a time; returns the new file's size in bytes."""
        sink = self.out.parquet_sink(name, self.schema, ROW_GROUP_ROWS)
        try:
            if old_file is None:
                sink.write(fresh)
            else:
                for part in self._merged(old_file, fresh):
                    sink.write(part)
        except BaseException:
            sink.abort()
            raise
        return sink.close()

    def _merged(self, old_file: str, fresh: pa.Table) -> Iterator[pa.Table]:
        fresh_keys = fresh.column("key").to_pylist()
        j = 0
        with self.out.fs.open(self.out.path(old_file), "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=ROW_GROUP_ROWS):
                part = pa.Table.from_batches([batch]).cast(self.schema)
                k = bisect.bisect_right(fresh_keys, part.column("key")[-1].as_py(), lo=j)
                if k > j:
                    part = pa.concat_tables([part, fresh.slice(j, k - j)]).sort_by("key")
                    j = k
                yield part
        if j < len(fresh_keys):
            yield fresh.slice(j)
