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
             with `data.threads_per_actor` threads and keep-alive connections, writes the shard's
             accepted rows and rejects, and commits it.
3. score     (CLIP-score filter only) an actor pool (GPU if asked) scores the accepted rows.
4. global    (image dedup / CLIP score) decide the cut and the duplicates over all shards (Ray Data
             groupby per hash bucket), commit the decisions, then rewrite each shard without the
             rejected rows (Ray Data tasks).
5. manifest  assembled from the markers; stray files of interrupted attempts are removed.

All stage logic lives in plain modules (download.py, global_pass.py, dedup.py, clip_score.py ...);
this file only wires them to Ray.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from pipeline.config import DataConfig
from pipeline.dedup import (PAIR_DECISIONS, PAIR_DUPLICATES, bucket_prefix_length, later_duplicates, pair_index,
                            with_bucket)
from pipeline.download import ShardDownloader
from pipeline.filters import clip_score_cut
from pipeline.global_pass import (DECISIONS, DUPLICATE_SCHEMA, DUPLICATES, apply_to_shard, describe_cut,
                                  split_by_shard)
from pipeline.manifest import MANIFEST, build_manifest, summary
from pipeline.resume import DOWNLOAD, GLOBAL, PLAN, SCORE, STAGING, Plan, ShardSpec, load_plan, make_plan
from pipeline.sources import InputError, list_input_files
from pipeline.staging import stage_file
from storage import Folder, FolderLock, absolute, is_temporary

log = logging.getLogger("clipray.pipeline")


def run_pipeline(data: DataConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline for `data`; returns the manifest, also written to
    `{data.output}/manifest.json`. Raises ValueError for input that cannot run."""
    if not data.output:
        raise ValueError("data.output is not set: give a folder (local or s3://...) for shards/, rejects/ "
                         "and manifest.json")
    from ray_compat import data_context, disable_progress_bars  # without Ray 2.60's spurious deprecations

    ctx = data_context()
    previous = ctx.enable_progress_bars
    # One tqdm bar per phase in rows/accepted/images per second instead of Ray Data's, whose
    # "rows" here would be shards. Datasets copy the context when they are created.
    disable_progress_bars(ctx)
    try:
        return _run(data)
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
        plan = _make_plan(data, out)
    _say(data, f"pipeline: {plan.input_rows} input rows in {len(plan.shards)} shards "
               f"from {len(plan.files)} file(s) -> {out.url}")

    downloads = _markers(out, DOWNLOAD, plan.shards)
    already_done = len(downloads)
    todo = [s for s in plan.shards if s.name not in downloads]
    pair_duplicates = _pair_duplicates(data, out, plan) if data.filters.dedup_url_caption else {}
    phase_start = time.time()
    processed_rows = 0
    processed_accepted = 0
    if todo:
        for stats in _download(data, out, plan, todo, pair_duplicates):
            downloads[stats["shard"]] = stats
            processed_rows += stats["rows"]
            processed_accepted += stats["accepted"]
    download_s = time.time() - phase_start

    global_stats = _global_pass(data, out, plan, downloads) if data.filters.needs_global_pass else None

    run_info = {
        "shards": len(plan.shards),
        "shards_already_done": already_done,
        "rows_processed": processed_rows,
        "images_downloaded": processed_accepted,
        "download_s": round(download_s, 3),
        "rows_per_s": round(processed_rows / download_s, 2) if download_s > 0 and processed_rows else 0.0,
        "images_per_s": round(processed_accepted / download_s, 2) if download_s > 0 and processed_rows else 0.0,
    }
    manifest = build_manifest(data, [s.to_dict() for s in plan.shards], downloads, global_stats,
                              time.time() - start, run_info)
    _sweep(out, manifest)
    out.write_json(MANIFEST, manifest)
    _say(data, summary(manifest))
    return manifest


def _with_absolute_paths(data: DataConfig) -> DataConfig:
    """Local paths resolved against the driver's working directory before they travel to workers."""
    update: dict[str, Any] = {"output": absolute(data.output)}
    if data.input:
        update["input"] = absolute(data.input)
    clip = data.filters.clip_score
    if clip is not None:
        filters = data.filters.model_copy(update={"clip_score": clip.model_copy(update={"model": absolute(clip.model)})})
        update["filters"] = filters
    return data.model_copy(update=update)


# --- phase 1: plan


def _make_plan(data: DataConfig, out: Folder) -> Plan:
    import ray

    files = list_input_files(data)
    # No committed plan: nothing here belongs to a run that can be resumed. Markers without a plan
    # (a plan.json deleted by hand) must not be trusted by the new plan.
    out.remove_tree("_state")
    out.remove_tree(STAGING)
    staged, errors = [], []
    if len(files) == 1:
        # One file is read in the driver: a worker process would cost more than it saves.
        results = [lambda: stage_file(0, files[0], data, out)]
    else:
        stage = ray.remote(num_cpus=1)(stage_file)
        refs = [stage.remote(i, f, data, out) for i, f in enumerate(files)]
        results = [lambda ref=ref: ray.get(ref) for ref in refs]
    for f, result in zip(files, results):
        try:
            staged.append(result())
        except Exception as exc:  # noqa: BLE001 - collect every file's problem, report them together
            cause = getattr(exc, "cause", None) or exc
            errors.append(str(cause) if isinstance(cause, ValueError) else f"{f.url}: {type(cause).__name__}: {cause}")
    if errors:
        raise InputError("the URL list cannot be read; nothing was downloaded:\n  " + "\n  ".join(errors))
    plan = make_plan(data, staged)
    if plan.input_rows == 0:
        raise InputError(f"data.input {data.input!r} has no rows ({len(files)} file(s), all empty)")
    out.write_json(PLAN, plan.to_json())  # the commit of the plan phase
    return plan


# --- phase 2: download


class _DownloadUDF:
    """Ray Data actor: one ShardDownloader (threads + keep-alive pool) per actor."""

    def __init__(self, data: DataConfig, out: Folder, extra_schema: pa.Schema):
        # The actor holds one CPU (num_cpus=1 below): one thread decodes at a time, the others download.
        self.downloader = ShardDownloader(data, out, extra_schema, cpu_slots=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = []
        for spec, dups in zip(batch["spec"], batch["duplicates"]):
            duplicates = {int(row): first for row, first in json.loads(dups)}
            stats.append(self.downloader.process(ShardSpec.from_dict(json.loads(spec)), duplicates))
        return {"stats": [json.dumps(s) for s in stats]}


def _download(data: DataConfig, out: Folder, plan: Plan, todo: list[ShardSpec],
              pair_duplicates: dict[str, list]) -> Iterable[dict]:
    import ray

    actors = data.num_download_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = min(actors, len(todo))
    # Two shards per actor at a time when there is work enough: the second one starts while the
    # first waits on its slowest URLs. With fewer shards, one each, or one actor would take two
    # while another idles.
    per_actor = 2 if len(todo) >= 2 * actors else 1
    ds = ray.data.from_items([{"spec": json.dumps(s.to_dict()), "duplicates": json.dumps(pair_duplicates.get(s.name, []))}
                              for s in todo], override_num_blocks=len(todo))
    results = ds.map_batches(
        _DownloadUDF,
        fn_constructor_kwargs={"data": data, "out": out, "extra_schema": plan.extra_schema},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=actors, max_tasks_in_flight_per_actor=per_actor, max_concurrent_calls_per_actor=per_actor,
            enable_true_multi_threading=per_actor > 1,
        ),
        num_cpus=1,
    )
    _say(data, f"download: {len(todo)} shards ({sum(s.rows for s in todo)} rows) on {actors} actor(s) "
               f"x {data.threads_per_actor} threads")
    yield from _progress(data, results, "download", sum(s.rows for s in todo))


def _progress(data: DataConfig, results, desc: str, rows: int) -> Iterable[dict]:
    """Stream per-shard stats from a Ray Data result, with one tqdm bar in rows (and, for the
    download, the images accepted so far and images per second)."""
    from tqdm.auto import tqdm

    start = time.time()
    accepted = 0
    with tqdm(total=rows, desc=desc, unit="row", disable=not data.progress, smoothing=0.1) as bar:
        for row in results.iter_rows():
            stats = json.loads(row["stats"])
            accepted += stats.get("accepted", 0)
            bar.update(stats.get("rows", stats.get("accepted", 0) + stats.get("rejected", 0)))
            if desc == "download":
                elapsed = max(time.time() - start, 1e-9)
                bar.set_postfix(accepted=accepted, images_per_s=f"{accepted / elapsed:.1f}")
            yield stats


# --- phases 3 and 4: CLIP score and the global pass


class _ScoreUDF:
    def __init__(self, data: DataConfig, out: Folder):
        from pipeline.clip_score import ClipScorer

        cfg = data.filters.clip_score
        self.out = out
        self.scorer = ClipScorer(cfg.model, cfg.model_name, batch_size=cfg.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = []
        for spec_json, accepted in zip(batch["spec"], batch["accepted"]):
            stats.append(self.scorer.score_shard(ShardSpec.from_dict(json.loads(spec_json)), self.out, int(accepted)))
        return {"stats": [json.dumps(s) for s in stats]}


def _load_index(batch: dict[str, np.ndarray], out: Folder, cut: Optional[float]) -> pa.Table:
    """Ray Data UDF: the image-dedup index rows (key, sha256) of some shards, CLIP cut applied."""
    tables = []
    for spec_json in batch["spec"]:
        spec = ShardSpec.from_dict(json.loads(spec_json))
        index = out.read_parquet(spec.index_file, columns=["key", "sha256"])
        if cut is not None:
            scores = out.read_parquet(spec.score_file, columns=["score"]).column("score").to_numpy(zero_copy_only=False)
            index = index.filter(pa.array(scores >= cut))
        tables.append(index)
    return pa.concat_tables(tables) if tables else pa.table({"key": pa.array([], pa.string()),
                                                              "sha256": pa.array([], pa.string())})


def _load_pairs(batch: dict[str, np.ndarray], out: Folder, data: DataConfig) -> pa.Table:
    """Ray Data UDF: (key, pair digest) of the staged input rows of some shards that would be
    downloaded (see `dedup.pair_index`)."""
    from pipeline.filters import RowFilters

    filters = RowFilters(data.filters)
    tables = []
    for spec_json in batch["spec"]:
        spec = ShardSpec.from_dict(json.loads(spec_json))
        table = out.read_arrow(spec.input)
        tables.append(pair_index(table, [spec.key(r) for r in range(table.num_rows)], filters))
    return pa.concat_tables(tables) if tables else pa.table({"key": pa.array([], pa.string()),
                                                              "pair": pa.array([], pa.string())})


def _duplicates_in_bucket(group: pa.Table, digest_col: str, by: str) -> pa.Table:
    found = later_duplicates(group, digest_col)
    return pa.table({"key": found.column("key"), "first_key": found.column("first_key"),
                     "by": pa.array([by] * found.num_rows, pa.string())}, schema=DUPLICATE_SCHEMA)


def _duplicates_on_ray(shards: list[ShardSpec], loader, loader_kwargs: dict, digest_col: str, by: str,
                       rows: int) -> pa.Table:
    """Rows whose `digest_col` appeared with a smaller key, over the index rows `loader` makes of
    `shards` (a Ray Data UDF), grouped per hash bucket so no process holds every key; sorted by key."""
    import ray

    if not shards:
        return DUPLICATE_SCHEMA.empty_table()
    index = ray.data.from_items([{"spec": json.dumps(s.to_dict())} for s in shards],
                                override_num_blocks=min(len(shards), 200))
    index = index.map_batches(loader, fn_kwargs=loader_kwargs, batch_size=16, batch_format="numpy")
    prefix = bucket_prefix_length(rows)
    # Hash-shuffle partitions: a few per million rows (Ray's default of 200 costs more than the
    # work below a few million rows); each holds whole buckets.
    partitions = max(1, min(200, 16 ** prefix, rows // 250_000 + 1))
    bucketed = index.map_batches(with_bucket, fn_kwargs={"digest_col": digest_col, "prefix": prefix},
                                 batch_format="pyarrow")
    dups = bucketed.groupby("bucket", num_partitions=partitions).map_groups(
        _duplicates_in_bucket, fn_kwargs={"digest_col": digest_col, "by": by}, batch_format="pyarrow")
    found = [ray.get(ref) for ref in dups.to_arrow_refs()]
    tables = [t.cast(DUPLICATE_SCHEMA) for t in found if t.num_rows]
    return pa.concat_tables(tables).sort_by("key") if tables else DUPLICATE_SCHEMA.empty_table()


def _find_duplicates(data: DataConfig, out: Folder, shards: list[ShardSpec], rows: int,
                     cut: Optional[float]) -> pa.Table:
    """Image duplicates (same sha256) among the downloaded rows that pass the CLIP cut."""
    return _duplicates_on_ray(shards, _load_index, {"out": out, "cut": cut}, "sha256", "image sha256", rows)


def _pair_duplicates(data: DataConfig, out: Folder, plan: Plan) -> dict[str, list]:
    """{shard name: [[row, first key], ...]} of the rows that repeat an earlier (url, caption).

    Decided once over the whole input before any download and committed (`dedup.PAIR_DECISIONS`
    written after `PAIR_DUPLICATES`), so a resumed run rejects the same rows; which copy is kept
    (the smallest key) does not depend on timing."""
    if not out.exists(PAIR_DECISIONS):
        start = time.time()
        duplicates = _duplicates_on_ray(plan.shards, _load_pairs, {"out": out, "data": data}, "pair",
                                        "url and caption", plan.input_rows)
        out.write_parquet(PAIR_DUPLICATES, duplicates, row_group_rows=65_536)
        out.write_json(PAIR_DECISIONS, {"duplicates": duplicates.num_rows,
                                        "duration_s": round(time.time() - start, 3)})  # the commit
        _say(data, f"dedup (url, caption): {duplicates.num_rows} repeated rows will not be downloaded")
    per_shard = split_by_shard(out.read_parquet(PAIR_DUPLICATES), plan.shards)
    result = {}
    for name, table in per_shard.items():
        width = len(name)
        result[name] = [[int(key[width:]), first] for key, first in
                        zip(table.column("key").to_pylist(), table.column("first_key").to_pylist())]
    return result


def _apply_batch(batch: dict[str, np.ndarray], out: Folder, cut: Optional[float], cut_detail: str) -> dict:
    stats = []
    for spec_json, dups_json in zip(batch["spec"], batch["duplicates"]):
        rows = json.loads(dups_json)
        dups = pa.table({"key": [r[0] for r in rows], "first_key": [r[1] for r in rows], "by": [r[2] for r in rows]},
                        schema=DUPLICATE_SCHEMA)
        stats.append(apply_to_shard(ShardSpec.from_dict(json.loads(spec_json)), out, cut, cut_detail, dups))
    return {"stats": [json.dumps(s) for s in stats]}


def _global_pass(data: DataConfig, out: Folder, plan: Plan, downloads: dict[str, dict]) -> dict[str, dict]:
    import ray

    f = data.filters
    with_rows = [s for s in plan.shards if downloads[s.name]["accepted"] > 0]
    if f.clip_score is not None:
        done = _markers(out, SCORE, with_rows)
        todo = [s for s in with_rows if s.name not in done]
        if todo:
            actors = min(f.clip_score.num_actors, len(todo))
            ds = ray.data.from_items([{"spec": json.dumps(s.to_dict()), "accepted": downloads[s.name]["accepted"]}
                                      for s in todo], override_num_blocks=len(todo))
            scored = ds.map_batches(_ScoreUDF, fn_constructor_kwargs={"data": data, "out": out}, batch_size=1,
                                    batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                    num_cpus=1, num_gpus=f.clip_score.num_gpus or None)
            rows = sum(downloads[s.name]["accepted"] for s in todo)
            for _ in _progress(data, scored, "clip score", rows):
                pass

    if not out.exists(DECISIONS):
        cut, cut_detail, scored_rows = None, "", 0
        if f.clip_score is not None:
            scores = _read_scores(out, with_rows)
            scored_rows = len(scores)
            cut = clip_score_cut(scores, f.clip_score.threshold, f.clip_score.top_fraction)
            cut_detail = describe_cut(f.clip_score.threshold, f.clip_score.top_fraction, cut, scored_rows)
        duplicates = DUPLICATE_SCHEMA.empty_table()
        if f.dedup_sha256:
            rows = sum(downloads[s.name]["accepted"] for s in with_rows)
            duplicates = _find_duplicates(data, out, with_rows, rows, cut)
        out.write_parquet(DUPLICATES, duplicates, row_group_rows=65_536)
        out.write_json(DECISIONS, {"cut": cut, "cut_detail": cut_detail, "scored_rows": scored_rows,
                                   "duplicates": duplicates.num_rows})  # the commit of the decisions
    decisions = out.read_json(DECISIONS)
    cut = decisions["cut"]
    cut = float(cut) if cut is not None else None
    per_shard = split_by_shard(out.read_parquet(DUPLICATES), plan.shards)

    results = _markers(out, GLOBAL, plan.shards)
    todo = [s for s in plan.shards if s.name not in results]
    if todo:
        items = []
        for s in todo:
            dups = per_shard.get(s.name)
            rows = [] if dups is None else [list(r) for r in zip(*(dups.column(c).to_pylist()
                                                                    for c in ("key", "first_key", "by")))]
            items.append({"spec": json.dumps(s.to_dict()), "duplicates": json.dumps(rows)})
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        applied = ds.map_batches(_apply_batch, fn_kwargs={"out": out, "cut": cut, "cut_detail": decisions["cut_detail"]},
                                 batch_size=1, batch_format="numpy", num_cpus=1)
        rows = sum(downloads[s.name]["accepted"] for s in todo)
        for stats in _progress(data, applied, "dedup/filter", rows):
            results[stats["shard"]] = stats
    return results


def _read_scores(out: Folder, shards: list[ShardSpec]) -> np.ndarray:
    def one(spec: ShardSpec) -> np.ndarray:
        return out.read_parquet(spec.score_file, columns=["score"]).column("score").to_numpy(zero_copy_only=False)

    with ThreadPoolExecutor(16) as pool:
        parts = list(pool.map(one, shards))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# --- markers and cleanup


def _markers(out: Folder, phase: str, shards: list[ShardSpec]) -> dict[str, dict]:
    """Stats of the committed shards of `phase` among `shards`, by shard name."""
    wanted = {s.name: s for s in shards}
    names = [n for n in out.list(f"_state/{phase}", ".json") if n.rsplit("/", 1)[-1][:-5] in wanted]
    with ThreadPoolExecutor(16) as pool:
        stats = list(pool.map(out.read_json, names))
    return {s["shard"]: s for s in stats}


def _sweep(out: Folder, manifest: dict[str, Any]) -> None:
    """Remove what interrupted attempts left: files in shards/ and rejects/ that no committed shard
    owns, and the intermediate `_work/` folder. (The folder lock guarantees no other run is
    writing here, so nothing found is another run's work in progress.)"""
    owned = {f["path"] for f in manifest["shards"]} | {f["path"] for f in manifest["rejects"]}
    stray = [n for n in out.list("shards", ".parquet") + out.list("rejects", ".parquet") if n not in owned]
    if stray:
        log.warning("removing %d files no committed shard owns: %s", len(stray), ", ".join(stray[:5]))
        out.remove(stray)
    # temporary files of writers that were killed before their rename (local disks only)
    for folder in ("shards", "rejects", "_state", "_state/pairs", "_state/download", "_state/score", "_state/global"):
        out.remove([n for n in out.list(folder, ".tmp", hidden=True) if is_temporary(n)])
    out.remove_tree("_work")


def _say(data: DataConfig, message: str) -> None:
    log.info(message)
    if data.progress:
        print(message, flush=True)


__all__ = ["run_pipeline"]
