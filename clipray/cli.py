"""`clipray demo|pipeline|train|tune|eval|export`: one entry point for every stage.

`python -m pipeline`, `python -m training`, `python -m training.tune` and `python -m evaluation`
are the same commands under their package names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Callable, Optional, Sequence

from clipray.config import ConfigError, JobConfig, describe_keys, load_config
from storage import FolderInUse

EXIT_BAD_INPUT = 2

SECTIONS = {
    "pipeline": ("data", "ray"),
    "train": ("model", "train", "ray"),
    "tune": ("tune", "model", "train", "ray"),
    "eval": ("eval", "ray"),
}

COMMANDS = {
    "pipeline": (
        "Download, filter, dedup and shard image-text pairs into Parquet (Ray Data).",
        "clipray pipeline --config configs/cc3m.yaml --set data.output=s3://bucket/cc3m",
    ),
    "train": (
        "Contrastive pretraining of a CLIP on pipeline shards (Ray Train).",
        "clipray train --config configs/cc3m-vit-b-32.yaml --set train.num_workers=8 --set train.use_gpu=true",
    ),
    "tune": (
        "Sweep temperature and width scaling with Ray Tune and ASHA early stopping.",
        "clipray tune --config configs/tune-demo.yaml",
    ),
    "eval": (
        "Zero-shot classification, retrieval or linear probe of a trained CLIP.",
        "clipray eval --config configs/demo.yaml --set eval.task=retrieval --set eval.output=ret.json",
    ),
}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE.yaml",
        help="job config (YAML with sections data, model, train, tune, eval, ray); local path or fsspec URL",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, dotted (e.g. train.batch_size=64); the value is read as YAML; repeatable",
    )
    parser.add_argument("--debug", action="store_true", help="print the full traceback on errors")


def _add_export_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="write a trained model as an open_clip or Hugging Face model directory",
        description="Write a checkpoint as open_clip's hub layout (open_clip_config.json + "
        "open_clip_model.safetensors, loadable with open_clip.create_model_and_transforms('local-dir:DIR')) "
        "or as a Hugging Face CLIPModel directory (config.json, model.safetensors, tokenizer and "
        "preprocessor files; ViT models only).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  clipray export --model runs/clip/final --format hf --output exported/clip-hf",
    )
    export.add_argument("--model", required=True, metavar="RUN_OR_FINAL", help="run dir, final/ dir or checkpoint")
    # The formats are checked by training.model.export (imported only when the command runs).
    export.add_argument("--format", required=True, help="open_clip or hf")
    export.add_argument("--output", required=True, metavar="DIR", help="folder to write (local or s3://...)")
    export.add_argument("--model-name", help="architecture, for a checkpoint without model_config.json")
    export.add_argument("--debug", action="store_true", help="print the full traceback on errors")


def _run_export(args: argparse.Namespace) -> int:
    from training.model.export import export_checkpoint

    export_checkpoint(args.model, args.format, args.output, args.model_name)
    print(f"clipray export: wrote {args.format} model to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipray",
        description="Train CLIP models on Ray: from URL lists to an evaluated model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              clipray demo --workdir /tmp/clipray-demo
              clipray pipeline --config configs/cc3m.yaml
              clipray train --config configs/cc3m-vit-b-32.yaml --set train.batch_size=4096
            """
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="local dry run of the whole system on data it makes itself",
        description="Make a synthetic image-text data set, serve it over HTTP on 127.0.0.1, run the "
        "real pipeline, train a small CLIP with 2 Ray Train workers, evaluate it zero-shot, write a report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  clipray demo --workdir /tmp/clipray-demo",
    )
    demo.add_argument("--workdir", default="demo-run", help="folder for all outputs (default: demo-run)")
    demo.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the demo's embedded config (configs/demo.yaml); repeatable",
    )
    demo.add_argument("--debug", action="store_true", help="print the full traceback on errors")

    for name, (summary, example) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"example:\n  {example}\n\nconfig keys (YAML sections, or --set section.key=value):\n"
            + describe_keys(SECTIONS[name]),
        )
        _add_config_options(p)
        if name == "eval":
            p.add_argument(
                "--dump-predictions", action="store_true", help="also write per-sample predictions next to eval.output"
            )
            p.add_argument(
                "--suite",
                metavar="FILE",
                help="run a task list (DataComp's tasklist.yml format, or `datacomp`) over eval.data_root "
                "into the folder eval.output (= --set eval.suite=FILE)",
            )
        if name in ("pipeline", "train", "tune", "eval"):
            p.add_argument(
                "--print-config",
                action="store_true",
                help="print the validated config as YAML (credentials masked as ***) and exit without running",
            )
    _add_export_parser(sub)
    return parser


def init_ray(cfg: JobConfig) -> None:
    """Join `ray.address`, the cluster of a `ray job submit`, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": cfg.ray.include_dashboard, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        cores = os.cpu_count() or 1
        ray.init(num_cpus=cfg.ray.num_cpus or max(8, 2 * cores), **kwargs)


def _join_cluster(cfg: JobConfig, command: str) -> None:
    """init_ray, then refuse local paths on a cluster of several nodes (clipray.shared_paths)."""
    from clipray.shared_paths import alive_nodes, check_shared_paths

    init_ray(cfg)
    check_shared_paths(cfg, command, alive_nodes())


def _refuse_busy_folder(uri: Optional[str], config, what: str) -> None:
    """Stop before Ray starts when another live run holds the output folder (the runner takes the
    lock itself; this only makes a second run fail at once)."""
    from storage import Folder, FolderLock

    if uri:
        FolderLock(Folder(uri, config), what).check()


def _run_pipeline(cfg: JobConfig, args: argparse.Namespace) -> int:
    from pipeline.run import run_pipeline

    _refuse_busy_folder(cfg.data.output, cfg.data, "clipray pipeline")
    _join_cluster(cfg, "pipeline")
    run_pipeline(cfg.data)
    return 0


def _run_train(cfg: JobConfig, args: argparse.Namespace) -> int:
    from storage import join
    from training.driver import run_training

    _refuse_busy_folder(join(cfg.train.storage_path, cfg.train.name), cfg.train, "clipray train")
    _join_cluster(cfg, "train")
    run_training(cfg.model, cfg.train)
    return 0


def _run_tune(cfg: JobConfig, args: argparse.Namespace) -> int:
    from training.tune import check_sweep, run_sweep

    from storage import join

    check_sweep(cfg.model, cfg.train, cfg.tune)  # bad input fails before Ray starts
    _refuse_busy_folder(join(cfg.tune.storage_path, cfg.tune.name), cfg.train, "clipray tune")
    _join_cluster(cfg, "tune")
    run_sweep(cfg.model, cfg.train, cfg.tune)
    return 0


def _run_eval(cfg: JobConfig, args: argparse.Namespace) -> int:
    from evaluation.run import run_evaluation

    if args.dump_predictions:
        cfg.eval.dump_predictions = True
    _join_cluster(cfg, "eval")
    if cfg.eval.suite:
        from evaluation.suite import run_suite

        run_suite(cfg.eval)
    else:
        run_evaluation(cfg.eval)
    return 0


RUNNERS: dict[str, Callable[[JobConfig, argparse.Namespace], int]] = {
    "pipeline": _run_pipeline,
    "train": _run_train,
    "tune": _run_tune,
    "eval": _run_eval,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from clipray.demo import run_demo

            return run_demo(args.workdir, args.overrides)
        if args.command == "export":
            return _run_export(args)
        if getattr(args, "suite", None):
            args.overrides.append(f"eval.suite={json.dumps(args.suite)}")  # validated with the other keys
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "print_config", False):
            import yaml

            from storage.redact import redact_config

            print(yaml.safe_dump(redact_config(cfg.model_dump(mode="json")), sort_keys=False))
            return 0
        return RUNNERS[args.command](cfg, args)
    except ConfigError as exc:
        print(f"clipray {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, FileNotFoundError, FolderInUse) as exc:
        # Stage runners raise these for bad input found before any work starts.
        if args.debug:
            raise
        print(f"clipray {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main_for(command: str) -> None:
    """Entry for `python -m <package>`: the same command as `clipray <command>`."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
