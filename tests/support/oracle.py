"""The oracle interpreter: open_clip, transformers and clip-benchmark in a venv of their own
(tests/oracles/requirements.txt says why). A test hands it a script and files; what the script
prints on its last line as JSON comes back. Nothing of clipray is importable there: the oracle sees
only the files we wrote, the way a user's open_clip or transformers would."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ENV_VAR = "CLIPRAY_ORACLE_PYTHON"


def oracle_interpreter() -> Path | None:
    """The oracle venv's python from CLIPRAY_ORACLE_PYTHON, or None with the reason unset."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value)
    return path if path.is_file() else None


def missing_reason() -> str:
    value = os.environ.get(ENV_VAR)
    if not value:
        return f"{ENV_VAR} is unset: run through `make test`, which builds the oracle venv (.venv-oracles)"
    return f"{ENV_VAR}={value} does not exist: run `make oracles`"


def run_oracle(python: Path, script: str, *args: str, cwd: Path, timeout: float = 300) -> dict:
    """Run `script` (Python source) under the oracle interpreter with `args`; return the JSON object
    it prints on its last stdout line. Offline: no hub is ever asked."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV") and not key.startswith("CLIPRAY_")
    }
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    script_path = cwd / "oracle_script.py"
    script_path.write_text(script)
    done = subprocess.run(
        [str(python), str(script_path), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise AssertionError(f"oracle script failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
