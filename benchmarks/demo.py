"""`clipray demo` against issue 2's targets: wall time and held-out accuracy.

Runs the demo as a user does (`clipray demo --workdir DIR`, a fresh folder each run, installation
excluded), times it from the outside, then reads what the demo wrote (the eval JSONs and the
pipeline manifests) and prints each number beside its target:

    zero-shot accuracy by colour >= 0.95, by shape >= 0.85 (held-out images)
    retrieval R@5 >= 0.80 (image->text and text->image, held-out pairs)
    wall time <= 360 s on 2 cores (printed as a ratio to that budget)
    manifest: accepted + rejected == input_rows, the 3 bad URLs rejected with a reason

    python benchmarks/demo.py [--repeats 1] [--keep DIR] [-- extra clipray demo args, e.g. --set k=v]

Exit status 0 when every target holds in every run, 1 otherwise. The machine may be shared: the
load average before and after each run is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 360.0
TARGETS = [  # (eval file, metric, minimum)
    ("zeroshot-color.json", "acc1", 0.95),
    ("zeroshot-shape.json", "acc1", 0.85),
    ("retrieval.json", "image_retrieval_recall@5", 0.80),
    ("retrieval.json", "text_retrieval_recall@5", 0.80),
]
BAD_URL_REASONS = {"http_404", "not_an_image", "truncated_image"}


def run_once(workdir: Path, extra: list[str], log_path: Path) -> float:
    cmd = [sys.executable, "-m", "clipray", "demo", "--workdir", str(workdir), *extra]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise SystemExit(
            f"clipray demo exited {proc.returncode} after {wall:.0f} s; log {log_path}:\n" + "\n".join(tail)
        )
    return wall


def check(workdir: Path, wall: float) -> list[tuple[str, str, str, bool]]:
    """(what, value, target, ok) rows for one finished demo."""
    rows = []
    for name, metric, minimum in TARGETS:
        value = json.loads((workdir / "eval" / name).read_text())["metrics"][metric]
        rows.append((f"{name.removesuffix('.json')} {metric}", f"{value:.3f}", f">= {minimum:.2f}", value >= minimum))
    rows.append(("wall time (s)", f"{wall:.0f}", f"<= {BUDGET_S:.0f}", wall <= BUDGET_S))
    rows.append(("wall time / budget", f"{wall / BUDGET_S:.2f}", "<= 1.00", wall <= BUDGET_S))
    manifest = json.loads((workdir / "pipeline" / "train" / "manifest.json").read_text())
    balanced = manifest["accepted"] + manifest["rejected"] == manifest["input_rows"]
    rows.append(
        (
            "manifest accepted+rejected == input",
            f"{manifest['accepted']}+{manifest['rejected']}={manifest['input_rows']}",
            "equal",
            balanced,
        )
    )
    reasons = set(manifest.get("reasons", {}))
    rows.append(
        (
            "bad URLs rejected with their reason",
            f"{len(BAD_URL_REASONS & reasons)} of {len(BAD_URL_REASONS)}",
            "404, html, truncated",
            BAD_URL_REASONS <= reasons,
        )
    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", help="keep each run's workdir under this folder (default: temporary, removed)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipray-demo-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    print(
        f"clipray demo x {args.repeats} on {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"python {platform.python_version()}"
    )
    all_ok = True
    try:
        for i in range(args.repeats):
            workdir = base / f"run{i}"
            shutil.rmtree(workdir, ignore_errors=True)
            load_before = os.getloadavg()[0]
            wall = run_once(workdir, extra, base / f"run{i}.log")
            load_after = os.getloadavg()[0]
            print(f"\nrun {i}: {wall:.0f} s, load average {load_before:.1f} before, {load_after:.1f} after")
            print(f"  {'what':<42}{'value':>14}  {'target':<18}ok")
            for what, value, target, ok in check(workdir, wall):
                all_ok &= ok
                print(f"  {what:<42}{value:>14}  {target:<18}{'yes' if ok else 'NO'}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print("\nall targets met" if all_ok else "\nsome target NOT met")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
