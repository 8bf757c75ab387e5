"""Shared fixtures: a local Ray cluster for the session, the path to ../shared, and a guard that
fails the run on any deprecation Ray reports (Ray logs most of them instead of warning)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

# img2dataset imports albumentations, which checks for updates over the network at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
DEPRECATION = re.compile(r"deprecat", re.IGNORECASE)


class _DeprecationLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if DEPRECATION.search(message):
            self.messages.append(f"{record.name}: {message}")


_RAY_DEPRECATIONS = _DeprecationLog()


def pytest_configure(config):
    logging.getLogger("ray").addHandler(_RAY_DEPRECATIONS)


def pytest_collection_modifyitems(config, items):
    """`make test` passes CLIPRAY_HEAVY_TESTS=0: the tests marked `heavy` skip, saying where they
    run (CI sets HEAVY=1). A plain `pytest`, without the variable, runs everything."""
    if os.environ.get("CLIPRAY_HEAVY_TESTS") != "0":
        return
    skip = pytest.mark.skip(reason="heavy end-to-end test: CI runs it (.ci/run); locally `make test HEAVY=1`")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if _RAY_DEPRECATIONS.messages:
        lines = "\n  ".join(sorted(set(_RAY_DEPRECATIONS.messages)))
        print(f"\nRay reported deprecations (treat as bugs):\n  {lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` from the project root; tests that need it skip in a user's clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (a user's clone has no ../shared reference material)")
    return SHARED


def ray_session_deprecations(session_dir: Path) -> list[str]:
    """Deprecation lines in the logs of a Ray session's driver-side and worker processes."""
    found = []
    for log in sorted((session_dir / "logs").glob("*")):
        if log.is_file() and log.suffix in (".err", ".out", ".log"):
            for line in log.read_text(errors="replace").splitlines():
                if DEPRECATION.search(line):
                    found.append(f"{log.name}: {line.strip()}")
    return found


@pytest.fixture(scope="session")
def oracle_python() -> Path:
    """The oracle venv's interpreter (open_clip, transformers, clip-benchmark); skips, saying why,
    where it is absent (a user's plain `pytest`)."""
    from tests.support.oracle import missing_reason, oracle_interpreter

    python = oracle_interpreter()
    if python is None:
        pytest.skip(missing_reason())
    return python


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spinning against other
    processes slow small models down by orders of magnitude."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (8 logical CPUs so Train + Data fit on 2 cores).

    Tests that need their own cluster (ray start --head, Cluster utils) must use a separate
    temp dir and stop exactly the processes they started. At the end, the session's logs are
    scanned: a deprecation reported by any Ray process fails the run.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}},
        )
    from ray_compat import session_dir as ray_session_dir

    session_dir = Path(ray_session_dir())
    yield ray
    ray.shutdown()
    _RAY_DEPRECATIONS.messages.extend(ray_session_deprecations(session_dir))
