"""Images that carry their own URL in their pixels, and the check that a stored image is its row's.

The hostile-host tests must prove that no image is ever stored under another URL's row (a desynced
keep-alive connection hands one URL's response to the next request). Metadata cannot carry the
proof, because the pipeline decodes and re-encodes every image; so the URL is drawn:

    url_image(url)            # 96x96 PNG: the first 64 bits of sha256(url) as an 8x8 grid of
                              # black/white 12 px cells (row-major, most significant bit first)
    decode_url_bits(stored)   # the 64 bits back from a stored image (any square size), or None
    url_bits(url)             # the 64 bits the row's URL must decode to

A cell survives the pipeline's resize (any square target of 8 px per cell or more: at 64 px each
cell is one 8x8 JPEG block) and JPEG at any sane quality: a cell's mean stays within 40 of 0 or
255. `decode_url_bits` refuses an image with any cell near the middle (not one of ours), so a
foreign image never decodes by luck; 64 bits make two test URLs colliding a 2**-64 event.

The harness below runs a list of `Case`s (a URL, and the outcomes that are right for it) through
the pipeline (`run_cases`: `run_pipeline` on Ray) or through one download actor (`run_shard`:
`ShardDownloader` in this process) and lists every broken rule in `CaseRun.problems`: a row lost
or counted twice, a reason that is not a stable code (or is `internal_error`), an outcome the case
does not allow, a stored image that is not its own row's URL image.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

GRID = 8  # cells per side: GRID * GRID bits
CELL_PX = 12  # pixels per cell side in the served image
_CLEAN = 64  # a decoded cell's mean must be below this or above 255 - this


def url_bits(url: str) -> int:
    """The 64-bit identity of `url`: the first 8 bytes of sha256 of its UTF-8 bytes."""
    return int.from_bytes(hashlib.sha256(url.encode("utf-8")).digest()[:8], "big")


def url_pixels(url: str) -> np.ndarray:
    """[GRID*CELL_PX, GRID*CELL_PX] uint8 grey image of `url`'s bits (set bit: white cell)."""
    bits = url_bits(url)
    cells = np.array([(bits >> (GRID * GRID - 1 - i)) & 1 for i in range(GRID * GRID)], dtype=np.uint8)
    grid = cells.reshape(GRID, GRID) * 255
    return np.kron(grid, np.ones((CELL_PX, CELL_PX), dtype=np.uint8))


def url_image(url: str, fmt: str = "PNG") -> bytes:
    """The encoded image (RGB, `fmt` PNG or JPEG at quality 95) a host serves for `url`."""
    image = Image.fromarray(url_pixels(url), "L").convert("RGB")
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decode_url_bits(encoded: bytes) -> Optional[int]:
    """The 64 bits drawn in a stored image, or None when it is not square or a cell is not clearly
    black or white (an image that is not a URL image, or one damaged beyond reading)."""
    image = Image.open(io.BytesIO(encoded))
    if image.width != image.height or image.width < GRID:
        return None
    cells = np.asarray(image.convert("L").resize((GRID, GRID), Image.Resampling.BOX), dtype=np.int32)
    if np.any((cells >= _CLEAN) & (cells <= 255 - _CLEAN)):
        return None
    bits = 0
    for value in cells.reshape(-1):
        bits = (bits << 1) | int(value > 127)
    return bits


def identity_problems(rows: list[dict], names_by_bits: dict[int, str]) -> list[str]:
    """What is wrong with stored rows (dicts with `url`, `caption`, `jpg`): for each row whose image
    does not decode to its own URL's bits, one line naming the row and, when the decoded bits are
    another known URL's (`names_by_bits` {url_bits(url): name}), whose image it holds."""
    problems = []
    for row in rows:
        got = decode_url_bits(row["jpg"])
        if got == url_bits(row["url"]):
            continue
        if got is None:
            whose = "an image that is not a URL image"
        else:
            whose = f"the image of {names_by_bits.get(got, f'an unknown URL (bits {got:016x})')}"
        problems.append(f"row {row['caption']!r} ({row['url']}) is stored with {whose}")
    return problems


# --- the black-box harness: rows in, every outcome and every stored image checked

ACCEPTED = "accepted"  # an outcome: stored, with its own URL's image


@dataclass(frozen=True)
class Case:
    """One input row. `name` is its caption (unique within a run); `allowed` the outcomes it may
    end with: ACCEPTED and/or reject reason codes (a stable code, never `internal_error`)."""

    name: str
    url: str
    allowed: frozenset


def case(name: str, url: str, *allowed: str) -> Case:
    if not allowed:
        raise ValueError(f"case {name!r}: say which outcomes it may end with")
    return Case(name, url, frozenset(allowed))


@dataclass
class Outcome:
    result: str  # ACCEPTED or the reject reason
    stage: str
    detail: str


@dataclass
class CaseRun:
    """What became of each case (`outcomes` by name) and every broken rule (`problems`)."""

    counts: dict  # input_rows, accepted, rejected as the run reported them
    outcomes: dict[str, Outcome]
    problems: list[str]
    seconds: float = 0.0  # how long run_pipeline / ShardDownloader.process took

    def report(self) -> str:
        """The problems, then one line per case: what it ended as, and the detail of a reject."""
        lines = ["problems:"] + [f"  {p}" for p in self.problems] + ["outcomes:"]
        for name, outcome in self.outcomes.items():
            detail = outcome.detail.replace("\n", " ")[:160]
            lines.append(f"  {name}: {outcome.stage}/{outcome.result} {detail}")
        return "\n".join(lines)


def base_settings(folder: Path, rows: int) -> dict:
    """DataConfig values for a hostile run: loopback allowed, 64 px images, one shard, one actor,
    no retries, an 8 MiB response cap; tests override what their cases need."""
    return dict(
        input=str(folder / "list.tsv"),
        output=str(folder / "out"),
        allow_private_addresses=True,
        progress=False,
        image_size=64,
        rows_per_shard=rows,
        num_download_actors=1,
        timeout_s=3.0,
        retries=0,
        retry_backoff_s=0.0,
        max_response_bytes=8 << 20,
    )


def run_cases(folder: Path, cases: Sequence[Case], **settings: Any) -> CaseRun:
    """Write `cases` as a TSV URL list, run `run_pipeline` over it (a Ray cluster must be up) and
    check its output: nothing lost, every row once, stable reasons, each case within its allowed
    outcomes, and every stored image its own row's."""
    from pipeline.config import DataConfig
    from pipeline.run import run_pipeline

    _unique_names(cases)
    lines = ["url\tcaption"] + [f"{c.url}\t{c.name}" for c in cases]
    (folder / "list.tsv").write_text("\n".join(lines) + "\n")
    data = DataConfig(**{**base_settings(folder, len(cases)), **settings})
    start = time.monotonic()
    manifest = run_pipeline(data)
    seconds = time.monotonic() - start
    counts = {k: manifest[k] for k in ("input_rows", "accepted", "rejected")}
    return _check(folder / "out", cases, counts, seconds)


def run_shard(folder: Path, cases: Sequence[Case], resolver: Optional[Callable] = None, **settings: Any) -> CaseRun:
    """`cases` as one staged shard through the download actor's `ShardDownloader` in this process
    (no Ray), with `resolver` (host, port) -> [address, ...] in place of the system's when given;
    checked as `run_cases` checks a run."""
    from pipeline.config import DataConfig
    from pipeline.download import ShardDownloader
    from pipeline.resume import ShardSpec
    from storage import Folder

    _unique_names(cases)
    data = DataConfig(**{**base_settings(folder, len(cases)), **settings})
    out = Folder(str(folder / "out"))
    staged = "_work/input/hostile.arrow"
    out.write_arrow(
        staged,
        pa.table(
            {"url": [c.url for c in cases], "caption": [c.name for c in cases], "caption_ok": [True] * len(cases)}
        ),
    )
    spec = ShardSpec(
        id=0,
        name="00000",
        input=staged,
        rows=len(cases),
        source="hostile",
        first_row=0,
        row_digits=4,
        global_pass=False,
    )
    hooks = {"resolver": resolver} if resolver is not None else {}
    downloader = ShardDownloader(data, out, pa.schema([]), cpu_slots=1, **hooks)
    start = time.monotonic()
    try:
        stats = downloader.process(spec)
        seconds = time.monotonic() - start
    finally:
        downloader.close()
    counts = {"input_rows": len(cases), "accepted": stats["accepted"], "rejected": stats["rejected"]}
    return _check(folder / "out", cases, counts, seconds)


def _unique_names(cases: Sequence[Case]) -> None:
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names are captions and must be unique: {sorted(names)}")


def _read(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _check(out: Path, cases: Sequence[Case], counts: dict, seconds: float) -> CaseRun:
    from pipeline.reasons import is_known

    problems = []
    if counts["input_rows"] != len(cases) or counts["accepted"] + counts["rejected"] != len(cases):
        problems.append(f"{len(cases)} rows in, the run reports {counts}: rows were lost or invented")
    stored, rejects = _read(out / "shards"), _read(out / "rejects")
    by_name = {c.name: c for c in cases}
    outcomes: dict[str, Outcome] = {}
    for row in stored:
        outcomes.setdefault(row["caption"], []).append(Outcome(ACCEPTED, "", ""))
    for row in rejects:
        outcomes.setdefault(row["caption"], []).append(Outcome(row["reason"], row["stage"], row["detail"] or ""))
        if not is_known(row["reason"]) or row["reason"] == "internal_error":
            problems.append(f"row {row['caption']!r} rejected as {row['reason']!r}, not a stable reason code")
    single: dict[str, Outcome] = {}
    for c in cases:
        found = outcomes.get(c.name, [])
        if len(found) != 1:
            problems.append(f"row {c.name!r} ends {len(found)} times in the output, not once")
        if found:
            single[c.name] = found[0]
            if found[0].result not in c.allowed:
                problems.append(f"row {c.name!r} ended {found[0].result}, expected one of {sorted(c.allowed)}")
    problems += [f"row {name!r} is not an input row" for name in outcomes if name not in by_name]
    problems += [
        f"row {row['caption']!r} stored with url {row['url']!r}, its input URL is {by_name[row['caption']].url!r}"
        for row in stored
        if row["caption"] in by_name and row["url"] != by_name[row["caption"]].url
    ]
    problems += identity_problems(stored, {url_bits(c.url): f"row {c.name!r}" for c in cases})
    return CaseRun(counts, single, problems, seconds)
