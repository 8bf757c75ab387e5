"""`clipray eval --suite FILE`: a list of zero-shot tasks run over the data sets found under
`eval.data_root`, reported the way DataComp reports its 38-task benchmark.

The task list is DataComp's `tasklist.yml` format: a mapping from CLIP_benchmark's data set name
(`vtab/cifar100`, `imagenet1k`, `retrieval/flickr30k`) to `name`, `main_metric` (default `acc1`),
`tags` and other fields we keep but do not need (`size`, `num_classes`, `random_score`, `time`).
Two optional fields are ours: `task` (`zeroshot` / `retrieval`, or CLIP_benchmark's
`zeroshot_classification` / `zeroshot_retrieval`; default: retrieval when the main metric is a
recall or the entry is tagged `retrieval`) and `path` (the set's folder, relative to the data root).
`eval.suite: datacomp` is DataComp's own list, shipped in `evaluation/suites/`.

A task's data set is the first of `<data_root>/wds_<key with / as ->_test`, `wds_<key>`, `<key>`
(with `/` as `-`, then as written) that exists: DataComp's download layout, CLIP_benchmark's hub
names, plain folders (any layout `eval.dataset` reads). Absent sets and tasks whose main metric
is not one of ours (WinoGAViL's Jaccard score, the WILDS and fairness group metrics) are skipped
with a line each. The present sets are opened first, then their images are embedded in one pass:
with the Ray engine, one Ray Data stage over the union of every set (one actor pool, the model
loaded once per actor); each task's prompts or captions then follow `eval.engine: auto`. Each task then writes CLIP_benchmark's JSON (`<key with / as _>.json`)
under `eval.output`, and the suite writes `suite.csv` and `suite.md`: the main metric per task and
their average over the tasks that ran (DataComp averages all 38; the table says how many ran).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from evaluation.chunks import EvalDataset
from evaluation.config import EvalConfig
from evaluation.embed import ImageEmbedder, embed_ray
from evaluation.outputs import write_outputs
from evaluation.run import (
    align_embeddings,
    choose_engine,
    embed_dataset_images,
    evaluate_retrieval_dataset,
    evaluate_zeroshot_dataset,
    open_eval_dataset,
)
from storage import fsspec_filesystem, join, open_file, read_file, write_file

log = logging.getLogger(__name__)

BUILTIN_SUITES = {"datacomp": Path(__file__).resolve().parent / "suites" / "datacomp_tasklist.yaml"}
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
# DataComp reads its retrieval tasks from the Hugging Face hub (nlphuji/...), not as wds sets. Its
# MSCOCO task (5,000 images) is MSCOCO's 5k Karpathy test split, which CLIP_benchmark publishes as
# this wds set, looked for last. Its Flickr task is all 31,014 Flickr30k images, unlike
# CLIP_benchmark's wds_flickr30k (the 1k test split), so that one is not an alias.
CLIP_BENCHMARK_RETRIEVAL_SETS = {"retrieval/mscoco_2014_5k_test_image_text_retrieval": "mscoco_captions"}
TASK_NAMES = {
    "zeroshot": "zeroshot",
    "zeroshot_classification": "zeroshot",
    "retrieval": "retrieval",
    "zeroshot_retrieval": "retrieval",
}


@dataclass
class SuiteTask:
    key: str  # CLIP_benchmark's data set name, e.g. vtab/cifar100
    name: str  # for people, e.g. CIFAR-100
    task: str  # zeroshot | retrieval
    main_metric: str
    tags: list[str] = field(default_factory=list)
    path: Optional[str] = None  # the set's folder relative to the data root, when given

    @property
    def slug(self) -> str:
        return self.key.replace("/", "_")

    def unsupported(self) -> str:
        """Why this task cannot run here ("" when it can)."""
        if "fairness" in self.tags:
            return "fairness tasks need per-group metrics, which clipray does not compute"
        if _recall_k(self.main_metric) is not None or self.main_metric in CLASSIFICATION_METRICS:
            return ""
        return f"main metric {self.main_metric} is not computed by clipray"


def _recall_k(metric: str) -> Optional[int]:
    """k of `mean_recall@k`, `image_retrieval_recall@k`, `text_retrieval_recall@k`; else None."""
    for prefix in ("mean_recall@", "image_retrieval_recall@", "text_retrieval_recall@"):
        if metric.startswith(prefix) and metric[len(prefix) :].isdigit():
            return int(metric[len(prefix) :])
    return None


def load_suite(spec: str, cfg: Optional[EvalConfig] = None) -> list[SuiteTask]:
    """The tasks of a task list file (DataComp's tasklist.yml format) or of a built-in name."""
    if spec in BUILTIN_SUITES:
        text = BUILTIN_SUITES[spec].read_text(encoding="utf-8")
    else:
        data = read_file(spec, cfg)
        if data is None:
            raise FileNotFoundError(
                f"eval.suite {spec} does not exist (or give a built-in: {', '.join(BUILTIN_SUITES)})"
            )
        text = data.decode("utf-8")
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"eval.suite {spec} is not valid YAML: {exc}") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"eval.suite {spec} must map data set names to task entries (DataComp's tasklist.yml format)")
    tasks = []
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"eval.suite {spec}: entry {key!r} must be a mapping (name, main_metric, tags, ...)")
        tags = entry.get("tags") or []
        main_metric = str(entry.get("main_metric", "acc1"))
        given = entry.get("task")
        if given is not None and given not in TASK_NAMES:
            raise ValueError(f"eval.suite {spec}: entry {key!r} has task {given!r}; use one of {', '.join(TASK_NAMES)}")
        if given is not None:
            task = TASK_NAMES[given]
        else:
            task = "retrieval" if _recall_k(main_metric) is not None or "retrieval" in tags else "zeroshot"
        tasks.append(SuiteTask(str(key), str(entry.get("name", key)), task, main_metric, list(tags), entry.get("path")))
    return tasks


def task_folder(task: SuiteTask, data_root: str, cfg: EvalConfig) -> tuple[Optional[str], list[str]]:
    """(the first existing candidate folder under data_root or None, the candidates looked at)."""
    fs, root = fsspec_filesystem(data_root, cfg)
    dashed = task.key.replace("/", "-")
    names = [task.path] if task.path else [f"wds_{dashed}_test", f"wds_{dashed}", dashed, task.key]
    if not task.path and task.key in CLIP_BENCHMARK_RETRIEVAL_SETS:
        names.append(f"wds_{CLIP_BENCHMARK_RETRIEVAL_SETS[task.key]}")
    for name in dict.fromkeys(names):
        if fs.exists(f"{root.rstrip('/')}/{name}"):
            return join(data_root, name), names
    return None, names


def main_metric_value(metrics: dict[str, float], main_metric: str) -> float:
    """DataComp's main metric from a task's metrics: mean_recall@k is the mean of both directions."""
    if main_metric.startswith("mean_recall@"):
        k = main_metric.split("@", 1)[1]
        return 0.5 * (metrics[f"image_retrieval_recall@{k}"] + metrics[f"text_retrieval_recall@{k}"])
    return float(metrics[main_metric])


def embed_sets(sets: list[EvalDataset], model: torch.nn.Module, cfg: EvalConfig) -> list[dict[str, Any]]:
    """Image embeddings of every set; with the Ray engine, one Ray Data stage over all of them."""
    engine = choose_engine(cfg, sum(ds.num_rows for ds in sets))
    if engine != "ray" or len(sets) < 2:
        return [embed_dataset_images(ds, model, cfg.model_copy(update={"engine": engine})) for ds in sets]
    # Each set's row ids moved to a range of their own, so one stream carries them all.
    sizes = [max(c.row_start + c.num_rows for c in ds.chunks) for ds in sets]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    parts = [
        ds.to_ray().map_batches(
            _SuiteRows(int(off), read_paths=not (ds.image_in_parquet or ds.image_in_tar), storage=ds.storage),
            batch_format="numpy",
        )
        for ds, off in zip(sets, offsets)
    ]
    start = time.perf_counter()
    out = embed_ray(
        parts[0].union(*parts[1:]),
        ImageEmbedder,
        dict(model=model, precision=cfg.precision, decode_threads=cfg.decode_threads, storage=sets[0].storage),
        batch_size=cfg.batch_size,
        use_gpu=cfg.use_gpu,
        num_actors=cfg.num_actors,
        cpus_per_actor=cfg.cpus_per_actor,
    )
    seconds = time.perf_counter() - start
    log.info("embedded %d images of %d sets with the ray engine in %.1fs", sum(sizes), len(sets), seconds)
    embeddings = []
    for ds, off, size in zip(sets, offsets, sizes):
        mine = (out["row_id"] >= off) & (out["row_id"] < off + size)
        part = {k: v[mine] for k, v in out.items()}
        part["row_id"] = part["row_id"] - off
        unread = part["read_error"] != ""
        part["ok"] = part["ok"] & ~unread
        part["error"] = np.where(unread, part["read_error"], part["error"])
        embeddings.append(align_embeddings(part, ds, "ray", seconds))
    return embeddings


class _SuiteRows:
    """Ray map_batches function putting one set's rows into the suite's stream: row ids moved by the
    set's offset, and image paths read into bytes here, in the Ray task (one stream holds one image
    type: Arrow would cast paths to binary). A file that cannot be read is reported in `read_error`."""

    def __init__(self, offset: int, read_paths: bool, storage):
        self.offset, self.read_paths, self.storage = offset, read_paths, storage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.empty(len(batch["image"]), dtype=object)
        errors = np.full(len(batch["image"]), "", dtype=object)
        for i, value in enumerate(batch["image"]):
            if not self.read_paths or value is None:
                images[i] = value
                continue
            try:
                with open_file(str(value), "rb", self.storage) as fh:
                    images[i] = fh.read()
            except Exception as exc:  # counted with its reason, like an undecodable image
                errors[i] = f"{type(exc).__name__}: {exc}"[:300]
        return {"row_id": batch["row_id"] + self.offset, "image": images, "read_error": errors}


def run_suite(cfg: EvalConfig, model: Optional[torch.nn.Module] = None) -> dict[str, Any]:
    """Run `cfg.suite` over `cfg.data_root`; write the per-task JSONs and suite.csv / suite.md under
    `cfg.output`; return {"rows": [...], "average": float or None}."""
    if not (cfg.suite and cfg.data_root and cfg.output):
        raise ValueError("run_suite needs eval.suite, eval.data_root and eval.output")
    tasks = load_suite(cfg.suite, cfg)
    if model is None:
        if not cfg.model:
            raise ValueError("eval.model is not set: give a run dir, a final/ dir or a checkpoint file")
        from training.model import load_model

        model = load_model(cfg.model, name=cfg.model_name, storage=cfg)
    rows: dict[str, dict[str, Any]] = {}
    ready: list[tuple[SuiteTask, EvalConfig, EvalDataset]] = []
    for task in tasks:
        row = rows[task.key] = {"task": task.key, "name": task.name, "type": task.task, "main_metric": task.main_metric}
        reason = task.unsupported()
        folder, looked = (None, []) if reason else task_folder(task, cfg.data_root, cfg)
        if not reason and folder is None:
            reason = f"no data set under {cfg.data_root} (looked for {', '.join(looked)})"
        if reason:
            row.update(score=None, status=f"skipped: {reason}")
            print(f"suite: skipped {task.key} ({task.name}): {reason}")
            continue
        task_cfg = _task_config(cfg, task, folder)
        try:
            ds = open_eval_dataset(
                folder, task_cfg, need_labels=task.task == "zeroshot", need_captions=task.task == "retrieval"
            )
        except (ValueError, FileNotFoundError) as exc:
            row.update(score=None, status=f"failed: {exc}")
            print(f"suite: failed {task.key} ({task.name}): {exc}")
            continue
        ready.append((task, task_cfg, ds))
    was_training = model.training
    try:
        embeddings = embed_sets([ds for _, _, ds in ready], model, cfg) if ready else []
        for (task, task_cfg, ds), emb in zip(ready, embeddings):
            evaluate = evaluate_zeroshot_dataset if task.task == "zeroshot" else evaluate_retrieval_dataset
            try:
                result = evaluate(model, task_cfg, ds, emb)
            except (ValueError, FileNotFoundError) as exc:  # e.g. integer labels and no class names
                rows[task.key].update(score=None, status=f"failed: {exc}")
                print(f"suite: failed {task.key} ({task.name}): {exc}")
                continue
            if task.main_metric.startswith("mean_recall@"):
                result.metrics[task.main_metric] = main_metric_value(result.metrics, task.main_metric)
            write_outputs(result, task_cfg)
            score = main_metric_value(result.metrics, task.main_metric)
            rows[task.key].update(score=score, status="ok", num_samples=result.num_samples)
            print(f"suite: {task.key} ({task.name}): {task.main_metric}={score:.4f} ({result.num_samples} samples)")
    finally:
        model.train(was_training)
    scores = [r["score"] for r in rows.values() if r.get("score") is not None]
    average = float(np.mean(scores)) if scores else None
    summary = {"rows": list(rows.values()), "average": average, "num_tasks": len(tasks), "num_run": len(scores)}
    _write_tables(summary, cfg)
    print(f"suite: average of {len(scores)} of {len(tasks)} tasks: " + (f"{average:.4f}" if scores else "n/a"))
    return summary


def _task_config(cfg: EvalConfig, task: SuiteTask, folder: str) -> EvalConfig:
    """One task's eval config: its set, its name, its own class names and templates (the set's files)."""
    recall_k = sorted(set(cfg.recall_k) | ({_recall_k(task.main_metric)} - {None}))
    return cfg.model_copy(
        update=dict(
            dataset=folder,
            dataset_name=task.key,
            # The images went through the suite's one pass; a task's prompts and captions go to Ray
            # only when there are eval.ray_min_rows of them (a Ray Data job per task costs seconds).
            engine="auto" if cfg.engine == "ray" else cfg.engine,
            task=task.task,
            output=join(cfg.output, f"{task.slug}.json"),
            classnames=None,
            templates=None,
            recall_k=recall_k,
            suite=None,
            dump_predictions=False,
        )
    )


COLUMNS = ("task", "name", "type", "main_metric", "score", "num_samples", "status")


def _write_tables(summary: dict[str, Any], cfg: EvalConfig) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in summary["rows"]:
        writer.writerow({**row, "score": "" if row.get("score") is None else f"{row['score']:.6f}"})
    average = summary["average"]
    writer.writerow(
        {
            "task": "average",
            "name": f"average of {summary['num_run']} of {summary['num_tasks']} tasks",
            "score": "" if average is None else f"{average:.6f}",
            "status": "ok" if average is not None else "no task ran",
        }
    )
    write_file(join(cfg.output, "suite.csv"), buf.getvalue().encode(), cfg)
    lines = [
        f"# Suite: {cfg.suite}",
        "",
        f"Model: `{cfg.model or 'in-memory'}`; data root: `{cfg.data_root}`.",
        "",
        "| task | name | main metric | score | status |",
        "|---|---|---|---:|---|",
    ]
    for row in summary["rows"]:
        score = "" if row.get("score") is None else f"{row['score']:.4f}"
        lines.append(f"| {row['task']} | {row['name']} | {row['main_metric']} | {score} | {row['status']} |")
    shown = "n/a" if average is None else f"{average:.4f}"
    lines += [
        "",
        f"**Average over {summary['num_run']} of {summary['num_tasks']} tasks: {shown}** "
        "(DataComp's average is over all its tasks; skipped tasks are left out here, not counted as 0).",
        "",
    ]
    write_file(join(cfg.output, "suite.md"), "\n".join(lines).encode(), cfg)
