"""The Ray runner: `run_pipeline(data) -> manifest dict`.

Phases, each resumable shard by shard (see `resume.py`):

1. plan      list the input files, stage each into shard-sized Arrow files (one Ray task per
             file; a single file is staged in the driver), check columns, commit `_state/plan.json`.
             Bad input stops here, before any download (a malformed row is not bad input: it
             becomes a `filter/malformed_row` reject).
   pairs     (`filters.dedup_url_caption` only) find the rows that repeat an earlier (url, caption)
             over the whole input (Ray Data groupby per hash bucket), commit them in `_state/pairs/`;
             the download rejects them without fetching.
2. download  Ray Data `map_batches` over the shards still to do, on an actor pool
             (`ActorPoolStrategy`, one actor per CPU by default); each actor downloads its shard
             with up to `data.max_in_flight` requests in flight on one libcurl loop (keep-alive,
             `data.max_connections_per_host`), decodes on `data.threads_per_actor` threads, writes
             the shard's accepted rows and rejects, and commits it.
   retry     (`data.retry_rejects`, instead of the download, on a finished run) the same actor
             pool runs the rows rejected for a transient reason again and commits each shard
             anew (`retry.py`).
3. score     (CLIP-score filter only) an actor pool (GPU if asked) scores the accepted rows.
4. global    (image dedup / CLIP score) decide the cut and the duplicates over all shards (Ray Data
             groupby per hash bucket), commit the decisions, then rewrite each shard without the
             rejected rows (Ray Data tasks).
5. manifest  assembled from the markers; stray files of interrupted attempts are removed.

All stage logic lives in plain modules (download.py, global_pass.py, dedup.py, clip_score.py ...);
this file and `run_global.py` (the pair dedup, the CLIP score and the global pass) only wire them
to Ray.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from pipeline.column_filters import compute_cuts, load_cuts
from pipeline.config import DataConfig
from pipeline.download import ShardDownloader
from pipeline.manifest import MANIFEST, build_manifest, summary
from pipeline.progress import progress, say
from pipeline.resume import DOWNLOAD, PLAN, STAGING, Plan, ShardSpec, load_plan, make_plan, markers
from pipeline.retry import (
    ShardRetrier,
    begin_round,
    check_finished,
    current_round,
    end_round,
    shards_to_retry,
    transient_rejects,
)
from pipeline.run_global import global_pass, pair_duplicates
from pipeline.shards import tar_stats_file
from pipeline.sources import InputError, InputFile, list_input_files
from pipeline.staging import stage_file
from storage import Folder, FolderLock, absolute, is_temporary
from storage.redact import redact_text

log = logging.getLogger("clipray.pipeline")


def run_pipeline(data: DataConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline for `data`; returns the manifest, also written to
    `{data.output}/manifest.json`. Raises ValueError for input that cannot run."""
    if not data.output:
        raise ValueError(
            "data.output is not set: give a folder (local or s3://...) for shards/, rejects/ and manifest.json"
        )
    from ray_compat import data_context, disable_progress_bars  # without Ray 2.60's spurious deprecations

    ctx = data_context()
    previous = ctx.enable_progress_bars
    # One tqdm bar per phase in rows/accepted/images per second instead of Ray Data's, whose
    # "rows" here would be shards. Datasets copy the context when they are created.
    disable_progress_bars(ctx)
    try:
        return _run(data)
    except ValueError as exc:
        # Bad input is reported to the user with the URL that failed: without its credentials.
        exc.args = tuple(redact_text(a) if isinstance(a, str) else a for a in exc.args)
        raise
    finally:
        ctx.enable_progress_bars = previous


def _run(data: DataConfig) -> dict[str, Any]:
    start = time.time()
    data = _with_absolute_paths(data)
    out = Folder(data.output, data)
    with FolderLock(out, "clipray pipeline"):  # one run per output folder (a second fails here)
        return _run_locked(data, out, start)


def _run_locked(data: DataConfig, out: Folder, start: float) -> dict[str, Any]:
    plan = load_plan(out, data)
    if plan is None:
        if data.retry_rejects:
            raise ValueError(
                f"data.retry_rejects: data.output {out.url} holds no run to retry (no {PLAN}); run the "
                "pipeline without data.retry_rejects first"
            )
        plan = _make_plan(data, out)
    say(
        data,
        f"pipeline: {plan.input_rows} input rows in {len(plan.shards)} shards "
        f"from {len(plan.files)} file(s) -> {out.url}",
    )

    downloads = markers(out, DOWNLOAD, plan.shards)
    already_done = len(downloads)
    retry_round = None
    if data.retry_rejects:
        check_finished(out, plan, downloads)
        retry_round = current_round(out)
        phase_start = time.time()
        processed_rows, processed_accepted = _retry(data, out, plan, downloads, retry_round)
    else:
        compute_cuts(data, out, [s.input for s in plan.shards])  # data.filters.columns' top fractions
        repeated = pair_duplicates(data, out, plan) if data.filters.dedup_url_caption else {}
        phase_start = time.time()
        processed_rows, processed_accepted = _download_missing(data, out, plan, downloads, repeated)
    download_s = time.time() - phase_start

    global_stats = global_pass(data, out, plan, downloads) if data.needs_global_pass else None

    run_info = {
        "shards": len(plan.shards),
        "shards_already_done": already_done,
        "rows_processed": processed_rows,
        "images_downloaded": processed_accepted,
        "download_s": round(download_s, 3),
        "rows_per_s": round(processed_rows / download_s, 2) if download_s > 0 and processed_rows else 0.0,
        "images_per_s": round(processed_accepted / download_s, 2) if download_s > 0 and processed_rows else 0.0,
    }
    if retry_round is not None:
        run_info["retry_round"] = retry_round
    manifest = build_manifest(
        data, [s.to_dict() for s in plan.shards], downloads, global_stats, time.time() - start, run_info
    )
    _sweep(out, manifest)
    out.write_json(MANIFEST, manifest)
    if retry_round is not None:
        end_round(out, retry_round)
    say(data, summary(manifest))
    return manifest


def _with_absolute_paths(data: DataConfig) -> DataConfig:
    """Local paths resolved against the driver's working directory before they travel to workers."""
    update: dict[str, Any] = {"output": absolute(data.output)}
    if data.input:
        update["input"] = absolute(data.input)
    clip = data.filters.clip_score
    if clip is not None:
        filters = data.filters.model_copy(
            update={"clip_score": clip.model_copy(update={"model": absolute(clip.model)})}
        )
        update["filters"] = filters
    return data.model_copy(update=update)


# --- phase 1: plan


def _make_plan(data: DataConfig, out: Folder) -> Plan:
    files = list_input_files(data)
    # No committed plan: nothing here belongs to a run that can be resumed. Markers without a plan
    # (a plan.json deleted by hand) must not be trusted by the new plan.
    out.remove_tree("_state")
    out.remove_tree(STAGING)
    staged = _stage(data, out, list(enumerate(files)))
    plan = make_plan(data, staged)
    if plan.input_rows == 0:
        raise InputError(f"data.input {data.input!r} has no rows ({len(files)} file(s), all empty)")
    out.write_json(PLAN, plan.to_json())  # the commit of the plan phase
    return plan


def _stage(data: DataConfig, out: Folder, files: list[tuple[int, InputFile]]) -> list[dict[str, Any]]:
    """`stage_file` for each (index, file): one Ray task per file, a single file in the driver.
    Raises InputError naming every file that cannot be read."""
    import ray

    if len(files) == 1:
        # One file is read in the driver: a worker process would cost more than it saves.
        results = [lambda: stage_file(files[0][0], files[0][1], data, out)]
    else:
        stage = ray.remote(num_cpus=1)(stage_file)
        refs = [stage.remote(i, f, data, out) for i, f in files]
        results = [lambda ref=ref: ray.get(ref) for ref in refs]
    staged, errors = [], []
    for (_, f), result in zip(files, results):
        try:
            staged.append(result())
        except Exception as exc:  # noqa: BLE001 - collect every file's problem, report them together
            cause = getattr(exc, "cause", None) or exc
            errors.append(str(cause) if isinstance(cause, ValueError) else f"{f.url}: {type(cause).__name__}: {cause}")
    if errors:
        raise InputError("the URL list cannot be read; nothing was downloaded:\n  " + "\n  ".join(errors))
    return staged


# --- phase 2: download


class _DownloadUDF:
    """Ray Data actor: one ShardDownloader (a libcurl loop and decoder threads) per actor."""

    def __init__(self, data: DataConfig, out: Folder, extra_schema: pa.Schema):
        # The actor holds one CPU (num_cpus=1 below): one thread decodes at a time while the network
        # thread keeps the requests in flight.
        self.downloader = ShardDownloader(data, out, extra_schema, cpu_slots=1, column_cuts=load_cuts(out))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = []
        for spec, dups in zip(batch["spec"], batch["duplicates"]):
            duplicates = {int(row): first for row, first in json.loads(dups)}
            stats.append(self.downloader.process(ShardSpec.from_dict(json.loads(spec)), duplicates))
        return {"stats": [json.dumps(s) for s in stats]}


def _download_missing(
    data: DataConfig, out: Folder, plan: Plan, downloads: dict[str, dict], repeated: dict[str, list]
) -> tuple[int, int]:
    """Download the shards without a marker (all of them in a new run); their stats join
    `downloads`. repeated: the (url, caption) duplicates by shard (`pair_duplicates`).
    Returns (rows, accepted images) processed."""
    todo = [s for s in plan.shards if s.name not in downloads]
    if not todo:
        return 0, 0
    items = [{"spec": json.dumps(s.to_dict()), "duplicates": json.dumps(repeated.get(s.name, []))} for s in todo]
    rows = accepted = 0
    kwargs = {"data": data, "out": out, "extra_schema": plan.extra_schema}
    for stats in _on_actors(data, _DownloadUDF, kwargs, items, "download", sum(s.rows for s in todo), lambda s: s):
        downloads[stats["shard"]] = stats
        rows += stats["rows"]
        accepted += stats["accepted"]
    return rows, accepted


def _on_actors(data: DataConfig, udf, kwargs: dict, items: list[dict], desc: str, rows: int, counts) -> Iterable[dict]:
    """Run `udf` (a download-phase actor class, `kwargs` to construct it) over `items`, one shard
    each, on the download actor pool; yields each shard's stats as it completes (`progress`)."""
    import ray

    actors = data.num_download_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = min(actors, len(items))
    # Two shards per actor at a time when there is work enough: the second one starts while the
    # first waits on its slowest URLs. With fewer shards, one each, or one actor would take two
    # while another idles.
    per_actor = 2 if len(items) >= 2 * actors else 1
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    results = ds.map_batches(
        udf,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=actors,
            max_tasks_in_flight_per_actor=per_actor,
            max_concurrent_calls_per_actor=per_actor,
            enable_true_multi_threading=per_actor > 1,
        ),
        num_cpus=1,
    )
    say(
        data,
        f"{desc}: {len(items)} shards ({rows} rows) on {actors} actor(s) x up to {data.max_in_flight} requests in flight",
    )
    yield from progress(data, results, desc, rows, counts=counts)


# --- data.retry_rejects (see retry.py)


class _RetryUDF:
    """Ray Data actor: one ShardRetrier (a ShardDownloader working in _work/retry/) per actor."""

    def __init__(self, data: DataConfig, out: Folder, extra_schema: pa.Schema, round_: int):
        self.retrier = ShardRetrier(data, out, extra_schema, cpu_slots=1)
        self.round = round_

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = []
        for spec, previous in zip(batch["spec"], batch["previous"]):
            shard = ShardSpec.from_dict(json.loads(spec))
            stats.append(self.retrier.process(shard, json.loads(previous), self.round))
        return {"stats": [json.dumps(s) for s in stats]}


def _retry(data: DataConfig, out: Folder, plan: Plan, downloads: dict[str, dict], round_: int) -> tuple[int, int]:
    """Retry round `round_`: the transient rejects of the shards not yet retried in it; their new
    stats replace theirs in `downloads`. Returns (rows retried, of them accepted)."""
    todo = shards_to_retry(plan, downloads, round_)
    if todo:
        _restage(data, out, plan, todo)  # bad input stops here, before the run is touched
    begin_round(out, round_)
    if not todo:
        say(data, f"retry round {round_}: no rows rejected for a transient reason are left to retry")
        return 0, 0
    items = [{"spec": json.dumps(s.to_dict()), "previous": json.dumps(downloads[s.name])} for s in todo]
    rows = sum(transient_rejects(downloads[s.name]) for s in todo)
    kwargs = {"data": data, "out": out, "extra_schema": plan.extra_schema, "round_": round_}
    retried = accepted = 0
    for stats in _on_actors(data, _RetryUDF, kwargs, items, f"retry round {round_}", rows, lambda s: s["retry"]):
        downloads[stats["shard"]] = stats
        retried += stats["retry"]["rows"]
        accepted += stats["retry"]["accepted"]
    return retried, accepted


def _restage(data: DataConfig, out: Folder, plan: Plan, shards: list[ShardSpec]) -> None:
    """Stage again the input files that `shards` come from (a finished run removed `_work/`),
    checking that they give the plan's chunks: the retry needs the input the run was made from."""
    files = list_input_files(data)
    urls = [redact_text(f.url) for f in files]
    if urls != [redact_text(f["url"]) for f in plan.files]:
        raise InputError(
            f"data.input changed since the run in {out.url}: it now names {len(urls)} file(s) "
            f"({', '.join(urls[:3])}...), the run read {len(plan.files)} "
            f"({', '.join(f['url'] for f in plan.files[:3])}...); retry_rejects needs the same input"
        )
    needed = sorted({urls.index(redact_text(s.source)) for s in shards})
    for i, staged in zip(needed, _stage(data, out, [(i, files[i]) for i in needed])):
        chunks = [(c["name"], c["rows"]) for c in staged["chunks"]]
        expected = [(s.input, s.rows) for s in plan.shards if redact_text(s.source) == urls[i]]
        if chunks != expected:
            raise InputError(
                f"{urls[i]} changed since the run in {out.url}: it has {staged['rows']} rows, the run read "
                f"{plan.files[i]['rows']}; retry_rejects needs the input the run was made from"
            )


# --- markers and cleanup


def _sweep(out: Folder, manifest: dict[str, Any]) -> None:
    """Remove what interrupted attempts left: files in shards/ and rejects/ that no committed shard
    owns, and the intermediate `_work/` folder. (The folder lock guarantees no other run is
    writing here, so nothing found is another run's work in progress.)"""
    owned = {f["path"] for f in manifest["shards"]} | {f["path"] for f in manifest["rejects"]}
    owned |= {tar_stats_file(p) for p in owned if p.endswith(".tar")}
    listed = out.list("shards", ".parquet") + out.list("shards", ".tar") + out.list("shards", "_stats.json")
    stray = [n for n in listed + out.list("rejects", ".parquet") if n not in owned]
    if stray:
        log.warning("removing %d files no committed shard owns: %s", len(stray), ", ".join(stray[:5]))
        out.remove(stray)
    # temporary files of writers that were killed before their rename (local disks only)
    for folder in ("shards", "rejects", "_state", "_state/pairs", "_state/download", "_state/score", "_state/global"):
        out.remove([n for n in out.list(folder, ".tmp", hidden=True) if is_temporary(n)])
    out.remove_tree("_work")


__all__ = ["run_pipeline"]
