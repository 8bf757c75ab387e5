"""Tokenizer throughput: clipray's `training.tokenizer.tokenize` vs open_clip's tokenizer, same captions.

Prints captions/s of each, the ratio, and whether the ids are identical (they must be).

open_clip is not a dependency of clipray (it pulls torchvision and a CUDA torch), so run this from a
separate venv that has both open_clip and clipray's requirements, with the project on PYTHONPATH:

    python3 -m venv /tmp/ocvenv
    /tmp/ocvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/ocvenv/bin/pip install open_clip_torch==3.3.0 tokenizers ftfy regex numpy
    PYTHONPATH=. /tmp/ocvenv/bin/python benchmarks/tokenizer.py [--n 100000] [--rounds 3]

Without open_clip it measures clipray alone and says so. The captions are synthetic (no network):
CC3M-like English sentences from a fixed word list, by default ~5% with non-ASCII text (accents,
CJK, emoji, mojibake) and ~1% with HTML entities, so that the slow cleaning path is exercised too.
Timings interleave the two implementations round by round (the machine may be shared) and report
the median round. The ratio depends on the mix (`--non-ascii`/`--entities`): clipray skips ftfy
where it provably changes nothing (plain ASCII, most accented, CJK and emoji text), but mojibake,
curly quotes and HTML entities go through ftfy (~60-160 us a caption on both sides).
`--cpu-clock` times with process CPU time instead (see its help).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.tokenizer import Tokenizer  # noqa: E402

WORDS = (
    "a an the of in on at with and for to from by near over under two three several many small large "
    "red blue green white black yellow old young happy smiling dog cat man woman child children people "
    "car bus train street city beach mountain river lake tree flower garden house kitchen room table "
    "chair window door sky cloud sunset night snow rain field road bridge building park market food "
    "pizza coffee cup plate bowl book phone computer camera guitar ball game team player stadium crowd "
    "sitting standing walking running playing holding looking wearing eating riding jumping posing "
    "photo picture illustration vector image portrait view close-up background stock isolated "
    "vintage modern beautiful colorful wooden metal glass empty busy"
).split()
EXTRAS = [
    "café",
    "naïve résumé",
    "crème brûlée",
    "東京タワー",
    "北京 街道",
    "😀🎉",
    "Straße",
    "São Paulo",
    "cafÃ© Ã  la carte",
    "Ελλάδα",
    "Москва",
    "“quoted”",
    "—",
    "…",
]
ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;b&gt;"]


def make_captions(n: int, seed: int = 0, non_ascii: float = 0.05, entities: float = 0.01) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 18))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 2024)))
        if rng.random() < non_ascii:
            words.insert(rng.randrange(len(words)), rng.choice(EXTRAS))
        if rng.random() < entities:
            words.insert(rng.randrange(len(words)), rng.choice(ENTITIES))
        text = " ".join(words)
        out.append(text + rng.choice(["", ".", "", " !", ","]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="captions per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--non-ascii",
        type=float,
        default=0.05,
        help="fraction of captions with non-ASCII text (they need ftfy: slow on both sides)",
    )
    parser.add_argument("--entities", type=float, default=0.01, help="fraction with HTML entities")
    parser.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time with the process's CPU time (all its threads) instead of wall-clock "
        "time: on a shared machine this measures the work, not the waiting",
    )
    args = parser.parse_args()
    clock = time.process_time if args.cpu_clock else time.perf_counter
    captions = make_captions(args.n, non_ascii=args.non_ascii, entities=args.entities)
    plain = sum(c.isascii() and "&" not in c for c in captions) / len(captions)
    print(f"{args.n:,} captions, {plain:.1%} plain ASCII (the rest need ftfy/html cleaning)")

    t0 = time.perf_counter()
    ours = Tokenizer()
    ours(["warm up"])
    print(f"clipray tokenizer build: {time.perf_counter() - t0:.2f}s")
    try:
        import open_clip

        theirs = open_clip.get_tokenizer("ViT-B-32")
        print(f"open_clip {open_clip.__version__} tokenizer: {type(theirs).__name__}")
    except ImportError as e:
        theirs = None
        print(f"open_clip not importable ({e}): measuring clipray alone, no comparison")

    times: dict[str, list[float]] = {"clipray": [], "open_clip": []}
    identical = None
    for r in range(args.rounds):
        t = clock()
        ids = ours(captions)
        times["clipray"].append(clock() - t)
        if theirs is not None:
            t = clock()
            ref = theirs(captions)
            times["open_clip"].append(clock() - t)
            same = bool(ids.shape == ref.shape and (ids == ref).all())
            identical = same if identical is None else identical and same
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v))

    rate = {k: args.n / statistics.median(v) for k, v in times.items() if v}
    unit = "captions per CPU-second" if args.cpu_clock else "captions/s"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"load average {load}"
    )
    print(f"clipray:   {rate['clipray']:,.0f} {unit} (median of {args.rounds} rounds of {args.n:,})")
    if theirs is not None:
        print(f"open_clip: {rate['open_clip']:,.0f} {unit}")
        paired = statistics.median(b / a for a, b in zip(times["clipray"], times["open_clip"]))
        print(
            f"ratio clipray/open_clip: {rate['clipray'] / rate['open_clip']:.1f}x (median of per-round "
            f"ratios {paired:.1f}x); ids identical: {identical}"
        )
        if not identical:
            sys.exit("ids differ from open_clip's")


if __name__ == "__main__":
    main()
