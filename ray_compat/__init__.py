"""Every use of Ray's private or version-specific internals, in one place.

Ray's public API does not cover a few things clipray needs; each function here says which private
name it touches and why, so a Ray upgrade has one file to check. Ray is imported inside the
functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging

# Ray 2.60's DataContext warns about these fields whenever it is first built, although nothing
# sets them (its own __setattr__ sees the defaults during construction).
_SPURIOUS_DATA_CONTEXT_DEPRECATIONS = (
    "`use_push_based_shuffle` is deprecated",
    "`use_polars` is deprecated",
    "`use_arrow_tensor_v2` is deprecated",
)


def data_context():
    """Ray Data's current `DataContext` (public), built without Ray 2.60's spurious deprecation
    warnings (only those: a real deprecation still fails the tests)."""
    import warnings

    from ray.data import DataContext

    with warnings.catch_warnings():
        for message in _SPURIOUS_DATA_CONTEXT_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        return DataContext.get_current()


def disable_progress_bars(ctx) -> None:
    """No Ray Data progress bars in this process, and no notice about it.

    Private: the logger `ray.data._internal.progress` logs "Progress bars disabled. To enable, set
    ..." once per process, telling users to undo a choice made for them (the pipeline shows its own
    bars; training workers show none). Only that logger is quietened.
    """
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def set_train_report_log_level(level: str) -> None:
    """`train.log_level` for Ray Train's per-report records on the workers.

    Private: Ray 2.60 logs them through a logger named after the file of
    `ray.train.v2._internal.execution.context` (`logging.getLogger(__file__)`), outside the
    `ray.train` logger tree, so `RunConfig(logging_config=...)` does not reach them. Another Ray
    layout: nothing to adjust.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(level)


def session_dir() -> str:
    """The session folder (logs, sockets) of the Ray instance this process is connected to.

    Private: Ray has no public accessor for it (`ray._private.worker._global_node`); the test suite
    scans that folder's logs for deprecations Ray reports instead of raising.
    """
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


# `ray start` for a worker node on a loopback-only machine. Ray 2.60 replaces 127.0.0.1 by the
# machine's routable address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that setting its
# CLI refuses worker nodes (a guard meant for laptops). This runs the CLI with only that guard
# lifted. Private: the guard is the constant `ray._private.ray_constants.ENABLE_RAY_CLUSTER`, read
# by `ray.scripts.scripts`. Used by the tests' multi-node clusters (tests/support/ray_head.py) as
# `python -c LOOPBACK_WORKER_NODE_START start --address=...`.
LOOPBACK_WORKER_NODE_START = (
    "import sys, types\n"
    "import ray._private.ray_constants as constants\n"
    "import ray.scripts.scripts as scripts\n"
    "guard_lifted = types.ModuleType(constants.__name__)\n"
    "guard_lifted.__dict__.update(constants.__dict__)\n"
    "guard_lifted.ENABLE_RAY_CLUSTER = True\n"
    "scripts.ray_constants = guard_lifted\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "sys.exit(scripts.main())\n"
)


def working_dir_files(root, include_gitignore: bool = True) -> list[str]:
    """The files `ray job submit --working-dir root` would upload, as '/'-separated paths relative
    to `root`, sorted.

    Private: `ray._private.runtime_env.packaging._zip_files` is the function Ray's job submission
    packs a working dir with (walking `.rayignore` files, and `.gitignore` files unless
    `RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1`, which `include_gitignore=False` stands for). Ray has no
    public call that lists what it would upload, and predicting it by matching the ignore files
    ourselves could drift from what Ray does. The package is written to a temporary zip and read
    back; empty folders, which Ray packs too, are left out.
    """
    import tempfile
    import zipfile
    from pathlib import Path

    from ray._private.runtime_env.packaging import _zip_files

    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"working_dir_files: {root} is not a folder (a working dir must be one)")
    with tempfile.TemporaryDirectory(prefix="clipray-working-dir-") as tmp:
        package = Path(tmp) / "package.zip"
        _zip_files(str(root), [], str(package), include_gitignore=include_gitignore)
        with zipfile.ZipFile(package) as zf:
            return sorted(info.filename for info in zf.infolist() if not info.is_dir())


def gitignore_matcher(lines):
    """A predicate `match(relative_path) -> bool` for gitignore-style `lines` ('#' comments, '!'
    negations, gitwildmatch globs), as Ray matches each `.rayignore` line.

    Private: `ray._private.thirdparty.pathspec` is the copy of the `pathspec` package that Ray
    vendors and reads `.rayignore` with; clipray does not depend on `pathspec` itself. Used by the
    tests to read `.dockerignore`, whose rules are close to gitwildmatch (see its header).
    """
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", list(lines)).match_file
