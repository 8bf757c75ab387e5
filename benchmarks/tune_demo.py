"""The demo sweep's acceptance run, and what ASHA saved against training every trial to the end.

Runs `clipray tune --config configs/tune-demo.yaml` (6 trials: ViT-Tiny at 3 widths x 2
temperatures) on the demo's shards, checks the issue's acceptance (at least 6 trials, at least one
stopped early by ASHA, results.csv + best.json + sweep.png written, `clipray train` runs
best.json), and prints:

* wall time of the sweep and of the best.json run;
* the samples the sweep trained, against the baseline of training every trial to the full budget
  (what a grid without early stopping costs), and their ratio.

    python benchmarks/tune_demo.py                   # uses demo-run/pipeline/... (make demo first)
    python benchmarks/tune_demo.py --make-shards     # draws demo-style shards itself (no make demo)

Each run starts its own local Ray (`ray.num_cpus` from the config) through the CLI, as a user would.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where sweeps and runs go (default: a temp dir)")
    parser.add_argument(
        "--make-shards",
        action="store_true",
        help="draw demo-style shards (600 train / 300 held-out pairs) instead of demo-run's",
    )
    args = parser.parse_args()

    from clipray.config import load_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipray-tune-bench-")).resolve()
    overrides = [f"tune.storage_path={work / 'sweeps'}"]
    if args.make_shards:
        from tests.support.train_shards import write_shards

        write_shards(work / "shards" / "train", copies=2, rows_per_shard=200, side=64)
        write_shards(work / "shards" / "heldout", copies=1, rows_per_shard=300, side=64, split="heldout", seed=1)
        overrides += [f"train.data=[{work / 'shards' / 'train'}]", f"train.val_data=[{work / 'shards' / 'heldout'}]"]
    cfg = load_config(ROOT / "configs" / "tune-demo.yaml", overrides)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    set_args = [a for o in overrides for a in ("--set", o)]

    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}")
    started = time.perf_counter()
    sweep = subprocess.run(
        [sys.executable, "-m", "training.tune", "--config", "configs/tune-demo.yaml", *set_args], cwd=ROOT, env=env
    )
    sweep_s = time.perf_counter() - started
    if sweep.returncode != 0:
        print(f"FAIL: clipray tune exited {sweep.returncode}")
        return 1

    folder = Path(cfg.tune.storage_path) / cfg.tune.name
    rows = list(csv.DictReader((folder / "results.csv").open()))
    statuses = [r["status"] for r in rows]
    trained = sum(int(r["samples_seen"] or 0) for r in rows)
    baseline = len(rows) * cfg.train.samples
    checks = {
        "at least 6 trials": len(rows) >= 6,
        "ASHA stopped at least one trial early": "early_stopped" in statuses,
        "no trial failed": "failed" not in statuses,
        "results.csv, best.json, sweep.png written": all(
            (folder / f).exists() for f in ("results.csv", "best.json", "sweep.png")
        ),
    }
    started = time.perf_counter()
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipray",
            "train",
            "--config",
            str(folder / "best.json"),
            "--set",
            f"train.samples={cfg.train.batch_size * 4}",
            "--set",
            f"train.storage_path={work / 'runs'}",
        ],
        cwd=ROOT,
        env=env,
    )
    train_s = time.perf_counter() - started
    checks["clipray train --config best.json works"] = (
        train.returncode == 0 and (work / "runs" / f"{cfg.tune.name}-best" / "final" / "model.safetensors").exists()
    )

    print(
        f"\nsweep: {len(rows)} trials in {sweep_s:.0f} s ({', '.join(f'{statuses.count(s)} {s}' for s in sorted(set(statuses)))})"
    )
    print(f"best.json run ({cfg.train.batch_size * 4} samples): {train_s:.0f} s")
    print(
        f"samples trained: {trained} with ASHA vs {baseline} training every trial to the end "
        f"(ratio {trained / baseline:.2f}, {baseline / max(trained, 1):.2f}x fewer)"
    )
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(f"outputs: {folder}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
