"""Shared fixtures: a local Ray cluster for the session, and the path to ../shared."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# img2dataset imports albumentations, which checks for updates over the network at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` from the project root; tests that need it skip in a user's clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (a user's clone has no ../shared reference material)")
    return SHARED


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (8 logical CPUs so Train + Data fit on 2 cores).

    Tests that need their own cluster (ray start --head, Cluster utils) must use a separate
    temp dir and stop exactly the processes they started.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield ray
    ray.shutdown()
