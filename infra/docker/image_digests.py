"""Image digests beside image tags: check that each is recorded or noted, and record them.

    python infra/docker/image_digests.py check [--require-pinned]
    python infra/docker/image_digests.py record [TAG ...]

A tag can be moved to other content; a digest cannot. The places that choose an image tag:
- `infra/docker/Dockerfile`: each `FROM name:tag` (the base image);
- `infra/kuberay/kustomization.yaml`: each `images:` entry (`newName:newTag`), which replaces the
  image name `clipray` in every manifest (the image built from the Dockerfile and pushed).

Each must be either pinned (`FROM name:tag@sha256:<64 hex>`; a `digest: sha256:<64 hex>` key in the
images entry, which kustomize renders as `name:tag@sha256:...`) or carry the note

    # IMAGE_DIGEST: record at build time

(the line right above the FROM; a comment line inside the images entry). `check` lists them and
exits 1 when one has neither, or both (a note beside a pinned tag is stale); `--require-pinned`
also fails on notes, for a release. `record` looks up the digest of each noted tag with
`docker buildx imagetools inspect TAG --format '{{.Manifest.Digest}}'` (the registry's digest: the
manifest list's, for a multi-platform image) and writes it in place of the note; given TAGs, only
those. So: `record rayproject/ray:...` before `docker build`, `record <your registry>/clipray:...`
after `docker push`, where the registry is reachable.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
KUSTOMIZATION = ROOT / "infra" / "kuberay" / "kustomization.yaml"
NOTE = "# IMAGE_DIGEST: record at build time"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class ImageRef:
    """One chosen image tag. `line` is the 0-based line of the tag (the FROM line; the images
    entry's first line); `note_line` is that of its IMAGE_DIGEST note, None without one."""

    file: Path
    line: int
    tag: str
    digest: str | None
    note_line: int | None

    def where(self) -> str:
        path = self.file.relative_to(ROOT) if self.file.is_relative_to(ROOT) else self.file
        return f"{path}:{self.line + 1}"


def dockerfile_refs(path: Path = DOCKERFILE) -> list[ImageRef]:
    """The base images of `path`'s FROM lines (not `scratch`, not earlier build stages)."""
    lines = path.read_text().splitlines()
    refs, stages = [], set()
    for i, line in enumerate(lines):
        words = line.split()
        if not words or words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if not args:
            raise ValueError(f"{path}:{i + 1}: FROM names no image")
        image = args[0]
        is_base = image != "scratch" and image.lower() not in stages
        if len(args) >= 3 and args[1].upper() == "AS":
            stages.add(args[2].lower())
        if not is_base:
            continue
        tag, _, digest = image.partition("@")
        noted = i > 0 and lines[i - 1].strip() == NOTE
        refs.append(ImageRef(path, i, tag, digest or None, i - 1 if noted else None))
    return refs


def kustomization_refs(path: Path = KUSTOMIZATION) -> list[ImageRef]:
    """The `images:` entries of a kustomization (the text is read for the notes' places)."""
    entries = (yaml.safe_load(path.read_text()) or {}).get("images") or []
    lines = path.read_text().splitlines()
    starts = _images_entry_lines(lines, path)
    if len(starts) != len(entries):
        raise ValueError(
            f"{path}: found {len(starts)} `- ` lines under images: for {len(entries)} "
            "entries; write one entry per `- name:` line, at the start of the line"
        )
    refs = []
    for (start, end), entry in zip(starts, entries):
        tag = entry.get("newName", entry["name"]) + (f":{entry['newTag']}" if "newTag" in entry else "")
        notes = [j for j in range(start, end) if lines[j].strip() == NOTE]
        refs.append(ImageRef(path, start, tag, entry.get("digest"), notes[0] if notes else None))
    return refs


def _images_entry_lines(lines: list[str], path: Path) -> list[tuple[int, int]]:
    """(first line, end) of each entry of the top-level `images:` list."""
    if "images:" not in lines:
        return []
    spans: list[list[int]] = []
    for j in range(lines.index("images:") + 1, len(lines)):
        line = lines[j]
        if line.startswith("- "):
            spans.append([j, j + 1])
        elif line.startswith((" ", "#")) or not line.strip():
            if spans and line.startswith(" "):
                spans[-1][1] = j + 1
        else:
            break  # the next top-level key
    return [(a, b) for a, b in spans]


def all_refs() -> list[ImageRef]:
    return dockerfile_refs() + kustomization_refs()


def problems(refs: list[ImageRef], require_pinned: bool = False) -> list[str]:
    """What is wrong with each reference, as 'file:line: tag: what to do'."""
    found = []
    for ref in refs:
        if ref.digest is not None and not DIGEST.fullmatch(ref.digest):
            found.append(f"{ref.where()}: {ref.tag}: digest {ref.digest!r} is not sha256:<64 hex digits>")
        elif ref.digest and ref.note_line is not None:
            found.append(f"{ref.where()}: {ref.tag}: pinned to {ref.digest} but still noted '{NOTE}': delete the note")
        elif ref.digest is None and ref.note_line is None:
            found.append(
                f"{ref.where()}: {ref.tag}: no digest and no '{NOTE}' note: add the note, "
                "then run `python infra/docker/image_digests.py record` once it is pushed"
            )
        elif ref.digest is None and require_pinned:
            found.append(f"{ref.where()}: {ref.tag}: not pinned yet: run `python infra/docker/image_digests.py record`")
    return found


def registry_digest(tag: str) -> str:
    """The registry's digest of `tag`, from `docker buildx imagetools inspect`."""
    cmd = ["docker", "buildx", "imagetools", "inspect", tag, "--format", "{{.Manifest.Digest}}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        sys.exit("image_digests.py: `docker` is not on PATH (docker buildx looks the digest up)")
    digest = out.stdout.strip()
    if out.returncode != 0 or not DIGEST.fullmatch(digest):
        sys.exit(
            f"image_digests.py: `{' '.join(cmd)}` failed (exit {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[:500]}"
        )
    return digest


def record(refs: list[ImageRef], lookup=registry_digest, only: set[str] | None = None) -> list[tuple[ImageRef, str]]:
    """Pin every noted, unpinned reference (whose tag is in `only`, if given) to `lookup(tag)`,
    in place of its note."""
    unknown = (only or set()) - {ref.tag for ref in refs}
    if unknown:
        sys.exit(f"image_digests.py: no image tag {sorted(unknown)} here; the tags: {sorted(r.tag for r in refs)}")
    done = []
    for path in dict.fromkeys(ref.file for ref in refs):
        lines = path.read_text().splitlines(keepends=True)
        drop = set()
        for ref in (
            r
            for r in refs
            if r.file == path and r.digest is None and r.note_line is not None and (only is None or r.tag in only)
        ):
            digest = lookup(ref.tag)
            if path.name == "kustomization.yaml":
                indent = lines[ref.note_line][: len(lines[ref.note_line]) - len(lines[ref.note_line].lstrip())]
                lines[ref.note_line] = f"{indent}digest: {digest}\n"
            else:
                lines[ref.line] = lines[ref.line].replace(ref.tag, f"{ref.tag}@{digest}", 1)
                drop.add(ref.note_line)
            done.append((ref, digest))
        path.write_text("".join(line for j, line in enumerate(lines) if j not in drop))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="list the image tags; exit 1 on one neither pinned nor noted")
    check.add_argument("--require-pinned", action="store_true", help="fail on notes too (a release)")
    rec = sub.add_parser("record", help="pin each noted tag to its registry digest (docker buildx)")
    rec.add_argument("tags", nargs="*", metavar="TAG", help="only these tags (default: every noted one)")
    args = parser.parse_args(argv)
    refs = all_refs()
    if args.command == "record":
        for ref, digest in record(refs, only=set(args.tags) or None):
            print(f"{ref.where()}: {ref.tag} -> {digest}")
        refs = all_refs()
    for ref in refs:
        print(f"{ref.where()}: {ref.tag} {ref.digest or 'digest: record at build time'}")
    found = problems(refs, require_pinned=getattr(args, "require_pinned", False))
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
