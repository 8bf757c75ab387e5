"""Download benchmark: clipray's pipeline vs `img2dataset.download` on the same URL list.

    python benchmarks/download.py                    # 20,000 URLs; 2 processes (img2dataset: x 32 threads)
    python benchmarks/download.py --cores 2          # pin everything to 2 cores (bigger machines)
    python benchmarks/download.py --urls 2000 --quick

Both download the same list from one loopback HTTP server (a separate process: an asyncio loop
with prebuilt responses, HTTP/1.1 keep-alive, same bytes for both), resize to the same size and
mode, and write Parquet, with the same number of processes (img2dataset with --threads threads each,
clipray with its own default requests in flight per actor). Printed: images/s of each
(wall clock of the whole call: reading the list, starting workers, downloading, writing), their
ratio, the CPU-bound ceiling (decode + resize + encode of the same images with OpenCV in one
process, images/s per core x cores) with how close each tool gets to it, the steady-state rates
(workers' start-up left out) and where the CPU went.

clipray runs on a local Ray cluster started before the timed call, with Ray Data's per-cluster
service actors already up (as after any earlier Data job on a cluster; `--cold-ray` counts their
start too); its download actors start inside the timed call, as img2dataset's processes do.

Images are 512x384 photo-like JPEGs (a coarse random field, blurred, with sensor-like noise;
about 70 kB each at quality 90); `--distinct` of them are generated and the URLs cycle through
them (every URL is a separate request).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home otherwise
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_accounting import become_subreaper, measured  # noqa: E402
from benchmarks.download_tools import (  # noqa: E402
    cpu_ceiling,
    loopback_server,
    run_clipray,
    run_img2dataset,
    write_url_list,
)
from benchmarks.loopback_images import make_images  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=20_000)
    p.add_argument("--distinct", type=int, default=400, help="distinct images the URLs cycle through")
    p.add_argument("--processes", type=int, default=2, help="img2dataset processes = clipray download actors")
    p.add_argument("--threads", type=int, default=32, help="img2dataset's threads per process")
    p.add_argument("--cores", type=int, default=None, help="pin the benchmark (server included) to this many cores")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir, removed)")
    p.add_argument("--only", choices=["img2dataset", "clipray"], default=None)
    p.add_argument("--quick", action="store_true", help="shorter ceiling measurement")
    p.add_argument(
        "--cold-ray",
        action="store_true",
        help="count the start of Ray Data's per-cluster service actors in clipray's call (a fresh cluster)",
    )
    args = p.parse_args(argv)

    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    become_subreaper()
    cores = len(os.sched_getaffinity(0))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores usable, "
        f"python {platform.python_version()}; {args.urls} URLs, {args.processes} processes x "
        f"{args.threads} threads, {args.image_size}px {args.resize_mode}",
        flush=True,
    )

    images = make_images(args.distinct)
    print(
        f"images: {len(images)} distinct 512x384 JPEGs, mean {sum(map(len, images)) / len(images) / 1000:.0f} kB",
        flush=True,
    )
    ceiling = cpu_ceiling(images, args.image_size, 2.0 if args.quick else 6.0)

    results = {}
    with loopback_server(images, args.urls) as (urls, server_pid):
        url_list = write_url_list(work / "urls.parquet", urls)
        try:
            if args.only in (None, "img2dataset"):
                shutil.rmtree(work / "img2dataset", ignore_errors=True)
                results["img2dataset"] = measured(
                    lambda mark: run_img2dataset(
                        url_list,
                        work / "img2dataset",
                        mark,
                        processes_count=args.processes,
                        thread_count=args.threads,
                        image_size=args.image_size,
                        resize_mode=args.resize_mode,
                        number_sample_per_shard=args.rows_per_shard,
                        timeout=10,
                        retries=0,
                        extract_exif=False,
                        compute_hash="sha256",
                    ),
                    server_pid,
                )
                print(f"img2dataset: {results['img2dataset']}", flush=True)
            if args.only in (None, "clipray"):
                shutil.rmtree(work / "clipray", ignore_errors=True)
                results["clipray"] = measured(
                    lambda mark: run_clipray(
                        url_list,
                        work / "clipray",
                        mark,
                        cpus=args.processes,
                        cold_ray=args.cold_ray,
                        image_size=args.image_size,
                        resize_mode=args.resize_mode,
                        num_download_actors=args.processes,
                        rows_per_shard=args.rows_per_shard,
                        allow_private_addresses=True,
                        timeout_s=10,
                        retries=0,
                    ),
                    server_pid,
                )
                print(f"clipray:     {results['clipray']}", flush=True)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)

    ceiling_total = ceiling["opencv"] * cores
    print()
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
    print(
        f"CPU-bound ceiling: OpenCV decode+resize+encode {ceiling['opencv']:.0f} images/s per core x {cores} "
        f"cores = {ceiling_total:.0f} images/s (clipray's decode path alone: {ceiling['clipray']:.0f}/s per core)"
    )
    print("wall clock (whole call: read list, start workers, download, write):")
    for name, r in results.items():
        print(
            f"  {name:<12} {r['images_per_s']:8.1f} images/s  ({r['accepted']} images in {r['wall_s']:.1f}s; "
            f"{r['images_per_s'] / ceiling_total:.0%} of the ceiling)"
        )
    print(
        f"CPU time of the same call (the tool's processes, Ray's included, + the server's CPU for it); "
        f"rate on {cores} dedicated cores = {cores} / CPU-s per image:"
    )
    for name, r in results.items():
        projected = r["images_per_cpu_s"] * cores
        print(
            f"  {name:<12} {r['cpu_s']:7.1f} CPU-s + server {r['server_cpu_s']:5.1f} CPU-s -> "
            f"{r['images_per_cpu_s']:6.1f} images per CPU-s -> {projected:7.1f} images/s on {cores} cores "
            f"({projected / ceiling_total:.0%} of the ceiling)"
        )
    print("steady state (first shard's start to last shard's end, the workers' start-up left out):")
    for name, r in results.items():
        print(
            f"  {name:<12} {r['in_shard_images_per_s']:8.1f} images/s  "
            f"({r['in_shard_images_per_s'] / ceiling_total:.0%} of the ceiling)"
        )
    print(
        f"download workers alone ({args.processes} busiest processes: img2dataset's pool processes, "
        f"clipray's actors): CPU per image"
    )
    for name, r in results.items():
        others = r["cpu_s"] - r["worker_cpu_s"]
        print(
            f"  {name:<12} {r['worker_cpu_s']:7.1f} CPU-s -> {r['worker_cpu_s'] / r['accepted'] * 1000:.2f} ms per image"
            f"  (the tool's other processes, driver included: {others:.1f} CPU-s; server {r['server_cpu_s']:.1f} CPU-s)"
        )
    if len(results) == 2:
        wall = results["clipray"]["images_per_s"] / results["img2dataset"]["images_per_s"]
        cpu = results["clipray"]["images_per_cpu_s"] / results["img2dataset"]["images_per_cpu_s"]
        print(f"ratio clipray / img2dataset: {wall:.2f}x wall clock, {cpu:.2f}x per CPU-second (target >= 1.5x)")
        print(
            f"clipray vs ceiling: {results['clipray']['images_per_s'] / ceiling_total:.0%} wall clock, "
            f"{results['clipray']['images_per_cpu_s'] * cores / ceiling_total:.0%} by CPU time (target >= 70%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
