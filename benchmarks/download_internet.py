"""Download benchmark on an internet-like web: img2dataset vs clipray, each with its defaults, on one
URL list served by the loopback internet emulator (`benchmarks/internet_emulator.py`: 200 hosts on
127.0.0.2-127.0.0.201, log-normal time to first byte with median 150 ms and p95 1.5 s, per-host
bandwidth, dead, 404, resetting, redirecting and trickling hosts).

    python benchmarks/download_internet.py                       # 20,000 URLs
    python benchmarks/download_internet.py --quick               # 2,000 URLs, a shorter ceiling
    python benchmarks/download_internet.py --urls 5000 --runs clipray,clipray-zero-latency
    python benchmarks/download_internet.py --runs clipray,clipray-zero-latency --cpu-breakdown
    python benchmarks/download_internet.py --runs clipray,clipray-no-latency --clipray-set max_connections_per_host=16

Whole calls, one after the other, on the same CPUs and the same URL list (each against a fresh
emulator on the same port, so every run sees the same first-attempt latencies):
  img2dataset-default   `download()` with all its defaults (1 process x 256 threads, timeout 10 s,
                        no retries), given only the list's layout, Parquet output and the image size
  img2dataset-T         the same with processes_count = cores and thread_count T (64, 256, 512);
                        the best of these is the bar
  clipray               `run_pipeline` with a DataConfig that sets only input, output, image_size,
                        resize_mode (img2dataset's), allow_private_addresses and progress off
  clipray-zero-latency  the same call against benchmarks/download.py's zero-latency server
                        (127.0.0.1, every URL an image) with the same URL count
  clipray-no-latency    the same call on the same web with its latency taken away (the emulator's
                        `latency=False`: TTFB 0, no bandwidth cap; the same dead, 404, resetting,
                        redirecting and trickling hosts): what latency alone costs
Printed: images/s (accepted images / wall clock of the whole call), clipray / best img2dataset,
% of the CPU-bound ceiling (`download_tools.cpu_ceiling` x cores), clipray with latency / without
(the issue's measure: against the zero-latency server; and like for like: against the same web
without its latency),
rejects per reason for every run beside what the emulator's host mix implies, the CPU of every run
and of the server, and whether the issue's targets are met (>= 2x img2dataset's best, >= 70% of
the ceiling, latency costs < 10% of zero-latency throughput). `--json` keeps all of it.
`--cpu-breakdown` adds, for the clipray runs, the CPU-s of each process role (driver, Ray's daemons
and workers, the download actors per thread, the server) per phase and the busy cores over time
(`benchmarks/cpu_breakdown.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home otherwise
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_accounting import become_subreaper, measured  # noqa: E402
from benchmarks.cpu_breakdown import DetailedSampler, breakdown, print_breakdown  # noqa: E402
from benchmarks.download_tools import (  # noqa: E402
    cpu_ceiling,
    loopback_server,
    run_clipray,
    run_img2dataset,
    write_url_list,
)
from benchmarks.internet_emulator import EmulatorConfig, Web, running  # noqa: E402
from benchmarks.loopback_images import make_images  # noqa: E402

I2D_THREADS = (64, 256, 512)
RUNS = (
    "img2dataset-default",
    *(f"img2dataset-{t}" for t in I2D_THREADS),
    "clipray",
    "clipray-zero-latency",
    "clipray-no-latency",
)
TARGET_RATIO, TARGET_CEILING, TARGET_LATENCY_COST = 2.0, 0.70, 0.10


def _run(name: str, url_list: Path, out: Path, args, cores: int, server_pid: int) -> dict:
    """One whole call of run `name`, measured (wall clock, its CPU, the server's CPU)."""
    shutil.rmtree(out, ignore_errors=True)
    size = {"image_size": args.image_size, "resize_mode": args.resize_mode}
    if name == "img2dataset-default":
        call = functools.partial(run_img2dataset, url_list, out, **size)
    elif name.startswith("img2dataset-"):
        threads = int(name.rsplit("-", 1)[1])
        call = functools.partial(run_img2dataset, url_list, out, processes_count=cores, thread_count=threads, **size)
    else:
        tuned = dict(args.clipray_set)
        call = functools.partial(run_clipray, url_list, out, cpus=cores, allow_private_addresses=True, **size, **tuned)
    result = measured(call, server_pid, DetailedSampler if args.cpu_breakdown and name.startswith("clipray") else None)
    result["server_cpu_ms_per_url"] = result["server_cpu_s"] / args.urls * 1000
    if "sampler" in result:
        (t_start, t_end), epoch = result.pop("marks"), result["shard_epoch"]
        spans = [(epoch + a, epoch + b) for a, b in result["shard_spans_s"]]
        result["cpu_breakdown"] = breakdown(result.pop("sampler"), t_start, spans, t_end)
        print_breakdown(name, result)
    return result


def _report(results: dict, expected: dict, ceiling: dict, cores: int) -> dict:
    """Prints the tables and the targets; returns the derived numbers."""
    ceiling_total = ceiling["opencv"] * cores
    print()
    print(
        f"CPU-bound ceiling: OpenCV decode+resize+encode {ceiling['opencv']:.0f} images/s per core x {cores} "
        f"cores = {ceiling_total:.0f} images/s (clipray's decode path alone: {ceiling['clipray']:.0f}/s per core)"
    )
    print(
        "whole calls (images/s = accepted / wall clock; steady: first shard's start to last shard's end; "
        "CPU-s: all the tool's processes, Ray's included):"
    )
    print(
        f"  {'run':<22} {'images/s':>9} {'steady':>7} {'accepted':>9} {'wall s':>7} {'% ceiling':>10} "
        f"{'CPU-s':>7} {'server CPU-s':>13} {'per URL':>9}"
    )
    for name, r in results.items():
        print(
            f"  {name:<22} {r['images_per_s']:9.1f} {r['in_shard_images_per_s']:7.1f} {r['accepted']:9d} {r['wall_s']:7.1f} "
            f"{r['images_per_s'] / ceiling_total:10.1%} {r['cpu_s']:7.1f} {r['server_cpu_s']:13.2f} "
            f"{r['server_cpu_ms_per_url']:6.2f} ms"
        )
    reasons = sorted({k for r in results.values() for k in r["reasons"]} | (set(expected) - {"accepted"}))
    print("accepted and rejected rows per reason (expected: what the emulator's host mix implies for its runs):")
    names = ["expected", *results]
    print(f"  {'':<18}" + "".join(f"{n[:20]:>21}" for n in names))
    rows = {"accepted": [expected.get("accepted", 0)] + [r["accepted"] for r in results.values()]}
    for reason in reasons:
        rows[reason] = [expected.get(reason, 0)] + [r["reasons"].get(reason, 0) for r in results.values()]
    for reason, counts in rows.items():
        print(f"  {reason[:18]:<18}" + "".join(f"{c:>21d}" for c in counts))
    wanted = {k: v for k, v in expected.items() if k != "accepted"}
    for name, r in results.items():
        if name != "clipray-zero-latency":
            print(f"  {name}: rejects {'are' if r['reasons'] == wanted else 'are NOT'} the emulator's dead hosts")

    derived: dict = {"ceiling_images_per_s": ceiling_total}
    best = max(
        (n for n in results if n.startswith("img2dataset-") and n != "img2dataset-default"),
        key=lambda n: results[n]["images_per_s"],
        default=None,
    )
    print("targets (issue 15):" if "clipray" in results else "targets (issue 15): need the clipray run")
    if "clipray" in results:
        ours = results["clipray"]["images_per_s"]
        share = ours / ceiling_total
        derived["clipray_share_of_ceiling"] = share
        print(
            f"  clipray at {share:.1%} of the CPU ceiling (target >= {TARGET_CEILING:.0%}): {_met(share >= TARGET_CEILING)}"
        )
        if best:
            ratio = ours / results[best]["images_per_s"]
            derived.update(img2dataset_best=best, ratio_vs_img2dataset_best=ratio)
            print(
                f"  clipray / img2dataset's best ({best}, {results[best]['images_per_s']:.1f} images/s): "
                f"{ratio:.2f}x (target >= {TARGET_RATIO:g}x): {_met(ratio >= TARGET_RATIO)}"
            )
        for base, key, label in (
            ("clipray-zero-latency", "latency_over_zero_latency", "clipray with latency / without"),
            (
                "clipray-no-latency",
                "latency_over_same_web_without_latency",
                "like for like, the same web without its latency",
            ),
        ):
            if base in results:
                kept = derived[key] = ours / results[base]["images_per_s"]
                print(
                    f"  {label}: {kept:.2f} (latency costs {1 - kept:.0%}; "
                    f"target < {TARGET_LATENCY_COST:.0%}): {_met(1 - kept < TARGET_LATENCY_COST)}"
                )
    return derived


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _data_option(text: str) -> tuple:
    """KEY=VALUE -> (key, value) for a DataConfig field, the value read as YAML (16, 0.5, false)."""
    import yaml

    from pipeline.config import DataConfig

    key, sep, value = text.partition("=")
    if not sep or key not in DataConfig.model_fields:
        raise argparse.ArgumentTypeError(f"{text!r}: want KEY=VALUE with KEY a data.* field (e.g. max_in_flight=1024)")
    return key, yaml.safe_load(value)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=None, help="URL count (default 20,000; 2,000 with --quick)")
    p.add_argument("--quick", action="store_true", help="2,000 URLs unless --urls says otherwise; a 2 s ceiling")
    p.add_argument("--distinct", type=int, default=400, help="distinct images the URLs cycle through")
    p.add_argument("--hosts", type=int, default=200, help="emulated hosts, from 127.0.0.2 on")
    p.add_argument("--seed", type=int, default=0, help="the emulator's host assignment and latency draws")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--cores", type=int, default=None, help="pin the benchmark (servers included) to this many cores")
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="also write every number to this file")
    p.add_argument(
        "--cpu-breakdown",
        action="store_true",
        help="clipray runs: CPU-s per process role, per actor thread and per phase (benchmarks/cpu_breakdown.py)",
    )
    p.add_argument(
        "--clipray-set",
        action="append",
        default=[],
        type=_data_option,
        metavar="KEY=VALUE",
        help="a DataConfig value for the clipray runs (repeatable; YAML value): a tuned row, not the defaults",
    )
    args = p.parse_args(argv)
    if args.clipray_set:  # a bad value fails now, not after the img2dataset runs
        from pydantic import ValidationError

        from pipeline.config import DataConfig

        try:
            DataConfig(input="urls.parquet", output="out", **dict(args.clipray_set))
        except ValidationError as err:
            p.error(f"--clipray-set: {err}")
    if args.urls is None:
        args.urls = 2_000 if args.quick else 20_000
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        p.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")

    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    become_subreaper()
    cores = len(os.sched_getaffinity(0))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipray-internet-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    print(
        f"{started}; machine: {_cpu_model()}, {cores} cores usable, "
        f"python {platform.python_version()}; load average {load_before:.1f} (1 min) on {os.cpu_count()} CPUs; "
        f"{args.urls} URLs, {args.image_size}px {args.resize_mode}"
        + (f"; clipray TUNED: {dict(args.clipray_set)}" if args.clipray_set else "; clipray with its defaults"),
        flush=True,
    )
    config = EmulatorConfig(hosts=args.hosts, seed=args.seed)
    web = Web(config)
    expected = web.expected(args.urls)
    print(web.describe())
    print(f"expected outcome of {args.urls} URLs: {expected}", flush=True)
    images = make_images(args.distinct)
    print(
        f"images: {len(images)} distinct 512x384 JPEGs, mean {sum(map(len, images)) / len(images) / 1000:.0f} kB",
        flush=True,
    )
    ceiling = cpu_ceiling(images, args.image_size, 2.0 if args.quick else 6.0)

    results: dict = {}
    try:
        with running(config, images) as emulator:  # fixes the port every later emulator reuses
            port = emulator.port
        url_list = write_url_list(work / "urls.parquet", [web.url(i, port) for i in range(args.urls)])
        for name in (r for r in runs if r != "clipray-zero-latency"):  # the one run not on the emulator
            web_config = dataclasses.replace(config, latency=name != "clipray-no-latency")
            with running(web_config, images, port) as emulator:
                results[name] = _run(name, url_list, work / name, args, cores, emulator.pid)
            print(f"{name}: {results[name]}", flush=True)
        if "clipray-zero-latency" in runs:
            with loopback_server(images, args.urls) as (urls, server_pid):
                zero_list = write_url_list(work / "urls-zero-latency.parquet", urls)
                results["clipray-zero-latency"] = _run(
                    "clipray-zero-latency", zero_list, work / "clipray-zero-latency", args, cores, server_pid
                )
            print(f"clipray-zero-latency: {results['clipray-zero-latency']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min; {load_before:.1f} at the start)")
    derived = _report(results, expected, ceiling, cores)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "started": started,
                    "machine": _cpu_model(),
                    "cores": cores,
                    "load_average_start_end": [load_before, os.getloadavg()[0]],
                    "argv": sys.argv[1:] if argv is None else argv,
                    "emulator": web.describe(),
                    "expected": expected,
                    "ceiling_per_core": ceiling,
                    "runs": results,
                    "derived": derived,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
