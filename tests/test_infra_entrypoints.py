"""What the RayJobs and infra/submit.sh run: each entrypoint names a stage module and a config
that exist and validate; submit.sh builds the right `ray job submit` and rejects bad arguments.
No cluster needed (submit.sh runs with --dry-run)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.kuberay_manifests import DOCKERFILE, KUBERAY, RAYJOBS, ROOT, SUBMIT, load

MODULES = {"pipeline", "training", "training.tune", "evaluation"}
SUBMIT_COMMANDS = {"pipeline": "pipeline", "train": "training", "tune": "training.tune", "eval": "evaluation"}
BUCKET_FOR_TESTS = "clipray-test-bucket"


def image_app_dir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/")


def entrypoint_argv(path: Path) -> list[str]:
    """The RayJob's entrypoint as the submitter's shell splits it, with the bucket filled in."""
    entrypoint = load(path)["spec"]["entrypoint"]
    assert "${CLIPRAY_BUCKET}" in entrypoint or "$CLIPRAY_BUCKET" not in entrypoint
    return shlex.split(entrypoint.replace("${CLIPRAY_BUCKET}", BUCKET_FOR_TESTS))


def config_in_repo(config: str) -> Path:
    """A config path of the image (absolute, under its WORKDIR) or of the repo, as a repo file."""
    app = image_app_dir()
    rel = config[len(app) + 1 :] if config.startswith(app + "/") else config
    assert not Path(rel).is_absolute(), f"{config} is neither under the image's {app} nor relative"
    return ROOT / rel


def run_python(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_stage_module_answers_help(module: str):
    proc = run_python(["-m", module, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_names_a_module_and_a_config_that_exist_and_validate(path: Path):
    argv = entrypoint_argv(path)
    assert argv[:2] == ["python", "-m"] and argv[2] in MODULES, argv
    assert argv.count("--config") == 1
    config = config_in_repo(argv[argv.index("--config") + 1])
    assert config.is_file(), f"{path.name} names {config.relative_to(ROOT)}, which does not exist"
    # The whole command line, config and --set overrides included, validates without running.
    args = [a if a != argv[argv.index("--config") + 1] else str(config) for a in argv[2:]]
    proc = run_python(["-m", *args, "--print-config"])
    assert proc.returncode == 0, f"{path.name}: {' '.join(argv)}\n{proc.stderr}"
    printed = yaml.safe_load(proc.stdout)
    assert BUCKET_FOR_TESTS in json.dumps(printed), "the bucket override did not reach the config"


def submit_dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        ["bash", str(SUBMIT), "--dry-run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def rayjob_config(stage: str) -> str:
    argv = entrypoint_argv(KUBERAY / f"rayjob-{stage}.yaml")
    return str(config_in_repo(argv[argv.index("--config") + 1]).relative_to(ROOT))


@pytest.mark.parametrize("command", sorted(SUBMIT_COMMANDS))
def test_submit_sh_runs_the_stage_module_from_the_repo_as_working_dir(command: str):
    config = rayjob_config(command)
    proc = submit_dry_run(
        "--address",
        "http://127.0.0.1:8265",
        "--env",
        "AWS_ENDPOINT_URL=http://127.0.0.1:9000",
        command,
        "--config",
        str(ROOT / config),
        "--set",
        "ray.include_dashboard=false",
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert argv[argv.index("--working-dir") + 1] == "."
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    entry = argv[argv.index("--") + 1 :]
    module = SUBMIT_COMMANDS[command]
    # The config is passed relative to the repository: the job's working dir.
    assert entry == ["python", "-m", module, "--config", config, "--set", "ray.include_dashboard=false"]
    assert (ROOT / config).is_file()


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["train"], {}, "no cluster address"),
        (["--address", "http://h:8265", "fit"], {}, "unknown COMMAND 'fit'"),
        (["--address", "http://h:8265", "train", "--config", "/etc/hostname"], {}, "outside the repository"),
        (["--address", "http://h:8265", "train", "--config", "configs/no-such.yaml"], {}, "no such file"),
        (["--address", "http://h:8265", "--env", "CLIPRAY_UNSET_VAR", "train"], {}, "is not set"),
        (["--address", "http://h:8265", "--env", "1BAD=x", "train"], {}, "not a variable name"),
    ],
    ids=["no-address", "bad-command", "config-outside", "config-missing", "env-unset", "env-bad-name"],
)
def test_submit_sh_rejects_bad_arguments_with_a_reason(args: list[str], env: dict, message: str):
    proc = submit_dry_run(*args, env=env)
    assert proc.returncode == 2
    assert message in proc.stderr and "infra/submit.sh" in proc.stderr


def test_submit_sh_takes_the_address_from_ray_address_and_passes_s3_configs_through():
    proc = submit_dry_run("eval", "--config", "s3://bucket/eval.yaml", env={"RAY_ADDRESS": "http://10.0.0.1:8265"})
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[argv.index("--address") + 1] == "http://10.0.0.1:8265"
    assert argv[-4:] == ["-m", "evaluation", "--config", "s3://bucket/eval.yaml"]
