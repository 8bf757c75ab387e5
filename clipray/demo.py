"""`clipray demo`: the whole system on one machine, on data it makes itself.

Draw a synthetic image-text data set → serve it on 127.0.0.1 → pipeline (Ray Data) → training
(Ray Train, 2 workers) → zero-shot classification by colour and by shape, and retrieval, on a
held-out split → report.md. Every stage is the real code of its package, called through the same
runners as `clipray pipeline|train|eval`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from clipray.config import JobConfig, load_config
from clipray.demo_data import COLORS, SHAPES, SIZES, make_samples, write_split
from clipray.demo_server import StaticServer

TRAIN_COPIES = 4  # renders of each colour x shape x size x position combination for training
HELDOUT_COPIES = 1  # and for the held-out split (other random seeds: never seen in training)
IMAGE_SIDE = 96  # pixels of the served images; the pipeline resizes them to data.image_size
TEXT_CONTEXT = 16  # tokens: the longest demo caption is 12


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "data" / "images"

    def url_list(self, split: str) -> Path:
        return self.root / "data" / f"{split}.parquet"

    def pipeline_output(self, split: str) -> Path:
        return self.root / "pipeline" / split

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"


def _progress(message: str) -> None:
    print(f"[clipray demo] {message}", flush=True)


def embedded_config() -> dict[str, Any]:
    return yaml.safe_load(resources.files("clipray").joinpath("demo.yaml").read_text())


def build_config(paths: DemoPaths, overrides: Iterable[str]) -> JobConfig:
    """The embedded demo config with the workdir's paths filled in, then the user's overrides."""
    raw = embedded_config()
    raw["data"]["output"] = str(paths.pipeline_output("train"))
    raw["data"]["input"] = str(paths.url_list("train"))
    raw["train"]["data"] = [str(paths.pipeline_output("train") / "shards")]
    raw["train"]["val_data"] = [str(paths.pipeline_output("heldout") / "shards")]
    raw["train"]["storage_path"] = str(paths.runs)
    raw["eval"]["model"] = str(paths.runs / raw["train"]["name"] / "final")
    raw["eval"]["dataset"] = str(paths.pipeline_output("heldout") / "shards")
    return load_config(base=raw, overrides=list(overrides))


def write_demo_model(cfg: JobConfig, paths: DemoPaths) -> None:
    """Point model.name at WORKDIR/demo-model.json: the chosen model with a short text context."""
    from training.model import get_model_config, list_models

    if cfg.model.name not in list_models():
        return  # a model JSON the user chose: train it as it is
    model_json = get_model_config(cfg.model.name)
    model_json["text_cfg"]["context_length"] = TEXT_CONTEXT
    path = paths.root / "demo-model.json"
    path.write_text(json.dumps(model_json, indent=2))
    cfg.model.name = str(path)


def make_dataset(paths: DemoPaths, base_url: str) -> dict[str, int]:
    """Draw both splits into the workdir; returns rows per URL list (bad URLs included)."""
    train = make_samples("train", TRAIN_COPIES, seed=1)
    heldout = make_samples("heldout", HELDOUT_COPIES, seed=2)
    return {
        "train": write_split(
            train, paths.images / "train", base_url, paths.url_list("train"), side=IMAGE_SIDE, bad_urls=True
        ),
        "heldout": write_split(heldout, paths.images / "heldout", base_url, paths.url_list("heldout"), side=IMAGE_SIDE),
    }


def run_pipelines(cfg: JobConfig, paths: DemoPaths) -> dict[str, dict]:
    from pipeline.run import run_pipeline

    manifests = {}
    for split in ("train", "heldout"):
        data = cfg.data.model_copy(
            update={
                "input": str(paths.url_list(split)),
                "output": str(paths.pipeline_output(split)),
            }
        )
        _progress(f"pipeline: {split} URLs → {data.output}")
        manifests[split] = run_pipeline(data)
    return manifests


def zeroshot_templates() -> dict[str, list[str]]:
    """Prompt ensembles in the captions' own words: a class is every caption style that names it."""
    return {
        "color": [f"a {{c}} {shape}" for shape in SHAPES]
        + [f"a {size} {{c}} {shape}" for size in SIZES for shape in SHAPES],
        "shape": [f"a {color} {{c}}" for color in COLORS]
        + [f"a {size} {color} {{c}}" for size in SIZES for color in COLORS],
    }


def eval_tasks(cfg: JobConfig, paths: DemoPaths) -> dict[str, Any]:
    """One EvalConfig per demo metric: zero-shot by colour, by shape, and retrieval."""
    paths.eval_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for label, templates in zeroshot_templates().items():
        template_file = paths.eval_dir / f"templates-{label}.txt"
        template_file.write_text("\n".join(templates) + "\n")
        tasks[f"zeroshot-{label}"] = cfg.eval.model_copy(
            update={
                "task": "zeroshot",
                "label_col": label,
                "templates": str(template_file),
                "dataset_name": f"demo-heldout-{label}",
                "dump_predictions": True,
                "output": str(paths.eval_dir / f"zeroshot-{label}.json"),
            }
        )
    tasks["retrieval"] = cfg.eval.model_copy(
        update={
            "task": "retrieval",
            "dataset_name": "demo-heldout",
            "recall_k": [1, 5, 10],
            "output": str(paths.eval_dir / "retrieval.json"),
        }
    )
    return tasks


def run_demo(workdir: str, overrides: Iterable[str] = ()) -> int:
    # A dry run shows our own progress lines: Ray Data's per-dataset INFO records (console and log
    # file) keep warnings only. Set before Ray Data is imported; the local cluster's workers
    # inherit this environment.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    from clipray.cli import init_ray
    from clipray.demo_report import plot_predictions, print_summary, write_report
    from evaluation.run import run_evaluation
    from training.driver import run_training

    started = time.time()
    paths = DemoPaths(Path(workdir).resolve())
    cfg = build_config(paths, overrides)  # a bad --set fails here, before any work
    paths.root.mkdir(parents=True, exist_ok=True)
    write_demo_model(cfg, paths)
    (paths.root / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    with StaticServer(paths.images.parent) as server:
        _progress(f"drawing the data set and serving it on {server.url}")
        rows = make_dataset(paths, server.url + "/images")
        _progress(f"{rows['train']} training URLs (3 deliberately broken), {rows['heldout']} held-out URLs")
        init_ray(cfg)
        manifests = run_pipelines(cfg, paths)

    t = cfg.train
    workers = f"{t.min_workers} to {t.max_workers}" if t.elastic else str(t.max_workers)
    _progress(f"training {cfg.model.name} on {workers} Ray Train workers for {t.samples} samples")
    result = run_training(cfg.model, cfg.train)

    results = {}
    for name, task in eval_tasks(cfg, paths).items():
        _progress(f"evaluating: {name}")
        results[name] = run_evaluation(task)

    plot_predictions(
        paths.pipeline_output("heldout") / "shards",
        {label: paths.eval_dir / f"zeroshot-{label}.predictions.jsonl" for label in ("color", "shape")},
        paths.root / "heldout_predictions.png",
    )
    elapsed = time.time() - started
    report = write_report(
        paths.root,
        manifests,
        Path(result.path),
        results,
        elapsed,
        figures={"Held-out predictions": "heldout_predictions.png"},
    )
    print_summary(manifests, results, elapsed, report)
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else "demo-run"))
