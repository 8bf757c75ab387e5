""".dockerignore and .rayignore: what leaves this checkout for an image or a cluster. Data,
venvs and run outputs stay home, and so do secrets (.env, keys, cloud credentials), at any depth.

.rayignore is checked with Ray's own packaging code (ray_compat.working_dir_files: the files
`ray job submit --working-dir` uploads). .dockerignore with gitwildmatch, each pattern anchored at
the context root as Docker reads it (`runs` is ./runs only; `**/x` is x at any depth)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_compat import gitignore_matcher, working_dir_files
from tests.support.kuberay_manifests import ROOT

# Secret files, at the root and deeper, that neither an image nor an upload may carry.
SECRETS = [
    ".env",
    ".env.local",
    "configs/.env",
    "configs/.env.production",
    "server.pem",
    "infra/tls/server.key",
    "certs/client.p12",
    ".aws/credentials",
    ".aws/config",
    "infra/.aws/credentials",
    ".ssh/id_ed25519",
    "home/.ssh/config",
    ".kube/config",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    "id_rsa",
    "keys/id_ecdsa",
    "gcp/application_default_credentials.json",
    "gcp/service-account-clipray.json",
    "credentials.json",
]
# Code and configs with secret-sounding names that must still travel.
LOOKALIKES = [
    "storage/credentials.py",
    "pipeline/key_value.py",
    "configs/keys.yaml",
    "training/environment.py",
    "docs_env.txt",
]


def ignore_lines(name: str) -> list[str]:
    return [
        line.strip() for line in (ROOT / name).read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def docker_excludes():
    """`.dockerignore` as Docker reads it: every pattern from the context root."""

    def anchored(pattern: str) -> str:
        negate, body = ("!", pattern[1:]) if pattern.startswith("!") else ("", pattern)
        return negate + (body if body.startswith(("/", "**/")) else "/" + body)

    return gitignore_matcher(anchored(p) for p in ignore_lines(".dockerignore"))


def test_dockerignore_drops_venv_git_data_and_outputs_but_keeps_build_inputs():
    excluded = docker_excludes()
    for dropped in (
        ".venv/bin/python",
        ".venv-oracles/bin/python",
        ".git/HEAD",
        "demo-run/report.md",
        "runs/clip/metrics.jsonl",
        "sweeps/sweep/results.csv",
        "data/shard-0.parquet",
        "pipeline/__pycache__/run.cpython-311.pyc",
    ):
        assert excluded(dropped), f".dockerignore lets {dropped} into the build context"
    for kept in (
        "pyproject.toml",
        "README.md",
        "infra/docker/requirements.lock",
        "configs/eval-imagenet.yaml",
        "clipray/cli.py",
        "pipeline/run.py",
        "training/bpe_simple_vocab_16e6.txt.gz",
        "training/model/model_configs/ViT-B-32.json",
        "evaluation/prompts/imagenet_templates.txt",
        *LOOKALIKES,
    ):
        assert not excluded(kept), f".dockerignore drops {kept}, which the image needs"


@pytest.mark.parametrize("secret", SECRETS)
def test_dockerignore_keeps_secrets_out_of_the_build_context(secret: str):
    assert docker_excludes()(secret), f".dockerignore sends {secret} to the Docker build"


def test_the_docker_reading_anchors_patterns_at_the_root():
    """What the test above relies on: a bare `.env` in .dockerignore would miss configs/.env."""
    excluded = gitignore_matcher(["/.env", "**/*.pem"])
    assert excluded(".env") and not excluded("configs/.env")
    assert excluded("a/b/server.pem") and excluded("server.pem")


def test_both_ignore_files_name_the_same_secrets():
    def secrets_section(name: str) -> list[str]:
        lines = (ROOT / name).read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("# secrets"))
        return [line.strip() for line in lines[start + 1 :] if line.strip() and not line.startswith("#")]

    ray = [p.rstrip("/") for p in secrets_section(".rayignore")]
    docker = secrets_section(".dockerignore")
    assert docker == [f"**/{p}" for p in ray], "keep the secrets sections of .dockerignore and .rayignore alike"


def make_tree(root: Path, files: list[str]) -> None:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_rayignore_keeps_code_and_configs_and_drops_venv_git_data_outputs_and_secrets(tmp_path: Path):
    keep = [
        "pipeline/run.py",
        "training/model/model_configs/ViT-B-32.json",
        "configs/demo.yaml",
        "training/bpe_simple_vocab_16e6.txt.gz",
        "clipray/cli.py",
        "pyproject.toml",
        *LOOKALIKES,
    ]
    drop = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".venv-oracles/lib/python3.11/site-packages/open_clip/__init__.py",
        ".git/objects/ab/cdef",
        "vendor/lib/.git",  # a submodule's or worktree's .git is a file naming the real one
        "demo-run/pipeline/train/shards/part-0.parquet",
        "runs/clip/checkpoint_000001/model.pt",
        "sweeps/sweep/results.csv",
        "bench-out/bench.json",
        "data/urls.parquet",
        "training/__pycache__/loop.cpython-311.pyc",
        "clipray.egg-info/PKG-INFO",
        "tests/test_x.py",
        "final/model.safetensors",
        "lists/Train_GCC-training.tsv",
        "data/urls.csv.gz",
        "benchmarks/results/train_step.jsonl",
        *SECRETS,
    ]
    tree = tmp_path / "repo"
    make_tree(tree, keep + drop)
    (tree / ".rayignore").write_text((ROOT / ".rayignore").read_text())
    uploaded = set(working_dir_files(tree, include_gitignore=False))
    assert set(keep) <= uploaded, sorted(set(keep) - uploaded)
    assert not uploaded & set(drop), sorted(uploaded & set(drop))


def test_working_dir_files_lists_what_ray_uploads_and_rejects_a_file(tmp_path: Path):
    make_tree(tmp_path, ["a.py", "sub/b.py", "sub/skip.log"])
    (tmp_path / ".rayignore").write_text("*.log\n")
    assert working_dir_files(tmp_path) == [".rayignore", "a.py", "sub/b.py"]
    with pytest.raises(NotADirectoryError, match="a.py is not a folder"):
        working_dir_files(tmp_path / "a.py")


def test_the_repository_uploads_small_complete_and_without_secrets():
    # .gitignore switched off: .rayignore alone must keep the upload small.
    uploaded = working_dir_files(ROOT, include_gitignore=False)
    size = sum((ROOT / name).stat().st_size for name in uploaded)
    assert size < 20 * 1024 * 1024, f"the working-dir upload is {size / 2**20:.1f} MiB"
    tops = {name.split("/", 1)[0] for name in uploaded}
    assert {"clipray", "pipeline", "training", "evaluation", "configs", "pyproject.toml", "ray_compat"} <= tops
    assert not tops & {".venv", ".venv-oracles", ".git", "demo-run", "runs", "sweeps", "bench-out", "tests"}, tops
    assert not [n for n in uploaded if n.endswith((".parquet", ".pyc", ".safetensors", ".pem", ".key"))]
