"""The Docker image: infra/docker/Dockerfile (pinned base, non-root, layer order), the dependency
lock, and the image digests beside every image tag (infra/docker/image_digests.py). No Docker
engine needed."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.kuberay_manifests import DOCKERFILE, KUSTOMIZATION, LOCK, ROOT, dockerfile_from, dockerfile_lines

DIGEST_SCRIPT = ROOT / "infra" / "docker" / "image_digests.py"
A_DIGEST = "sha256:" + "0123456789abcdef" * 4
NOTE_LINE = "# IMAGE_DIGEST: record at build time\n"


def test_dockerfile_starts_from_a_pinned_ray_gpu_image_with_the_projects_python():
    from packaging.specifiers import SpecifierSet

    base = dockerfile_from().partition("@")[0]
    match = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert match, f"FROM {base}: expected rayproject/ray:X.Y.Z-pyXY-gpu (a pinned GPU tag)"
    python = f"{match.group(4)}.{match.group(5)}"
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert SpecifierSet(requires).contains(f"{python}.0"), f"image Python {python} vs requires-python {requires}"
    # The lock was made on the Python the image runs.
    assert f"on Python {python}," in LOCK.read_text().splitlines()[1]


def test_dockerfile_runs_as_a_non_root_user_from_the_first_install_on():
    lines = dockerfile_lines()
    users = [(i, line.split()[1]) for i, line in enumerate(lines) if line.upper().startswith("USER ")]
    assert users, "no USER: the image would run as whatever the base picked"
    last = users[-1][1].split(":")[0]
    assert last not in ("root", "0"), f"USER {last}"
    first_pip = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert users[0][0] < first_pip and all(u.split(":")[0] not in ("root", "0") for _, u in users)
    for line in lines:
        if line.upper().startswith("COPY"):
            assert "--chown=" in line and "--chown=0" not in line and "--chown=root" not in line, line


def test_dockerfile_installs_pinned_torch_and_dependencies_before_the_source():
    lines = dockerfile_lines()
    text = "\n".join(lines)
    torch_spec = re.search(r'ARG TORCH_SPEC="?(torch==[0-9][^"\s]*)"?', text)
    assert torch_spec, "torch must be pinned (ARG TORCH_SPEC=torch==X.Y.Z)"
    copy_pyproject = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "pyproject.toml" in line)
    copy_lock = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "requirements.lock" in line)
    copy_all = next(i for i, line in enumerate(lines) if re.match(r"COPY\s.*\s\.\s+\.$", line))
    install_lock = next(
        i for i, line in enumerate(lines) if "pip install" in line and "-r infra/docker/requirements.lock" in line
    )
    install_project = next(
        i for i, line in enumerate(lines) if "pip install" in line and re.search(r"\s\.(\s|$)", line)
    )
    assert copy_pyproject < copy_all and copy_lock < install_lock < copy_all < install_project
    assert "${TORCH_SPEC}" in lines[install_project] and "-c infra/docker/requirements.lock" in lines[install_project]
    # Bytecode compiled at build time: at run time the root filesystem is read-only.
    assert "compileall" in lines[install_project]


def test_requirements_lock_pins_every_dependency_of_pyproject():
    import importlib.metadata as metadata
    import tomllib

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req in deps:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins  # installed on its own, as the Dockerfile's TORCH_SPEC
            continue
        assert name in pins, f"{req} is missing from {LOCK.relative_to(ROOT)}; rerun infra/docker/lock_requirements.py"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]}, pyproject wants {req}"
        )
    # Closed: what a pinned package needs (as installed here at that version) is pinned too.
    env = default_environment()
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        for sub in map(Requirement, dist.requires or []):
            if sub.marker is None or sub.marker.evaluate({**env, "extra": ""}):
                sub_name = canonicalize_name(sub.name)
                assert sub_name in pins or sub_name == "torch", f"{name} needs {sub}, which the lock lacks"


# --- image digests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digests():
    """infra/docker/image_digests.py as a module (infra/ is not a package)."""
    spec = importlib.util.spec_from_file_location("image_digests", DIGEST_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_image_tag_is_pinned_or_noted_for_recording(digests):
    refs = digests.all_refs()
    assert {r.file for r in refs} == {DOCKERFILE, KUSTOMIZATION}
    assert digests.problems(refs) == []
    tags = {r.tag for r in refs}
    assert dockerfile_from().partition("@")[0] in tags
    assert any(t.startswith("ghcr.io/") for t in tags)  # the pushed clipray image of kustomization.yaml
    proc = subprocess.run([sys.executable, str(DIGEST_SCRIPT), "check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # No digest was invented: none is recorded in the repository yet, so a release check fails.
    assert all(r.digest is None for r in refs)
    strict = subprocess.run(
        [sys.executable, str(DIGEST_SCRIPT), "check", "--require-pinned"], capture_output=True, text=True, timeout=60
    )
    assert strict.returncode == 1 and "not pinned yet" in strict.stderr


def copies(tmp_path: Path) -> tuple[Path, Path]:
    dockerfile, kustomization = tmp_path / "Dockerfile", tmp_path / "kustomization.yaml"
    shutil.copy(DOCKERFILE, dockerfile)
    shutil.copy(KUSTOMIZATION, kustomization)
    return dockerfile, kustomization


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda df, kz: df.write_text(df.read_text().replace(NOTE_LINE, "")), "no digest and no"),
        (lambda df, kz: kz.write_text(kz.read_text().replace(NOTE_LINE, "")), "no digest and no"),
        (
            lambda df, kz: df.write_text(re.sub(r"^(FROM \S+)", rf"\1@{A_DIGEST}", df.read_text(), flags=re.M)),
            "still noted",
        ),
        (
            lambda df, kz: df.write_text(re.sub(r"^(FROM \S+)", r"\1@sha256:abc", df.read_text(), flags=re.M)),
            "is not sha256:<64 hex digits>",
        ),
    ],
    ids=["dockerfile-without-note", "kustomization-without-note", "stale-note", "short-digest"],
)
def test_a_tag_without_digest_or_note_is_caught(digests, tmp_path: Path, edit, expected: str):
    dockerfile, kustomization = copies(tmp_path)
    edit(dockerfile, kustomization)
    found = digests.problems(digests.dockerfile_refs(dockerfile) + digests.kustomization_refs(kustomization))
    assert any(expected in problem for problem in found), found


def test_record_pins_each_noted_tag_in_place_of_its_note(digests, tmp_path: Path):
    dockerfile, kustomization = copies(tmp_path)
    asked = []

    def lookup(tag: str) -> str:
        asked.append(tag)
        return A_DIGEST

    refs = digests.dockerfile_refs(dockerfile) + digests.kustomization_refs(kustomization)
    # The base image first (before `docker build`), the pushed image after `docker push`.
    digests.record(refs, lookup=lookup, only={refs[0].tag})
    assert asked == [refs[0].tag] and digests.kustomization_refs(kustomization)[0].digest is None
    digests.record(digests.dockerfile_refs(dockerfile) + digests.kustomization_refs(kustomization), lookup=lookup)
    assert sorted(asked) == sorted(r.tag for r in refs)
    pinned = digests.dockerfile_refs(dockerfile) + digests.kustomization_refs(kustomization)
    assert [r.digest for r in pinned] == [A_DIGEST] * len(refs)
    assert digests.problems(pinned, require_pinned=True) == []
    assert f"FROM {refs[0].tag}@{A_DIGEST}\n" in dockerfile.read_text()
    # kustomize reads the digest as the images entry's `digest:` key.
    import yaml

    (entry,) = yaml.safe_load(kustomization.read_text())["images"]
    assert entry["digest"] == A_DIGEST and entry["newTag"] == "0.1.0"
    with pytest.raises(SystemExit, match="no image tag"):
        digests.record(pinned, lookup=lookup, only={"elsewhere/clipray:0.1.0"})


def fake_docker(tmp_path: Path, script: str) -> dict:
    """PATH with a `docker` that runs `script` (there is no Docker engine or registry here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "docker").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_registry_digest_asks_docker_buildx_imagetools_and_checks_the_answer(
    digests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PATH", fake_docker(tmp_path, f'echo "$@" > {tmp_path}/args; echo {A_DIGEST}')["PATH"])
    assert digests.registry_digest("rayproject/ray:2.60.0-py311-gpu") == A_DIGEST
    assert (tmp_path / "args").read_text().split() == [
        "buildx",
        "imagetools",
        "inspect",
        "rayproject/ray:2.60.0-py311-gpu",
        "--format",
        "{{.Manifest.Digest}}",
    ]
    (tmp_path / "bin" / "docker").write_text("#!/bin/sh\necho 'ERROR: not found' >&2; exit 1\n")
    with pytest.raises(SystemExit, match="not found"):
        digests.registry_digest("nowhere/none:1")
