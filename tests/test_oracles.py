"""The oracle venv holds exactly the pinned releases the interop tests are written against."""

from __future__ import annotations

from pathlib import Path

from tests.support.oracle import run_oracle

REQUIREMENTS = Path(__file__).parent / "oracles" / "requirements.txt"

VERSIONS = """
import json, sys
from importlib.metadata import version
import open_clip, torchvision, transformers, clip_benchmark.cli  # importable together: why this venv exists
print(json.dumps({name: version(name).split("+")[0] for name in sys.argv[1:]}))
"""


def test_the_oracle_venv_holds_the_pinned_releases(oracle_python, tmp_path):
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[name] = pinned
    assert run_oracle(oracle_python, VERSIONS, *pins, cwd=tmp_path) == pins
