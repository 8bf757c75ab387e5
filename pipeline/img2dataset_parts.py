"""The parts of img2dataset the pipeline reuses: its `Resizer`, its `BoundingBoxBlurrer`, and its
X-Robots-Tag opt-out rule.

`resizer_class()` and `blurrer_class()` load img2dataset's own `resizer.py` / `blurrer.py` from the
installed package, but not the package's `__init__`, which imports torch, wandb, webdataset and
more (about 10 s per download actor on a small machine) for things the pipeline does not use. Loading it sets
NO_ALBUMENTATIONS_UPDATE (albumentations checks for updates over the network otherwise) and
silences the DeprecationWarning of its `imghdr` import.

`is_disallowed` applies img2dataset's X-Robots-Tag semantics (a directive applies when it has no
user-agent token or our token; any listed directive opts the image out). It is restated here
because img2dataset keeps it in `downloader.py`, whose imports pull in wandb;
tests/test_pipeline_fetch.py checks it agrees with img2dataset's function on a table of headers.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from functools import lru_cache
from typing import Iterable, Optional


@lru_cache(maxsize=None)
def _module(name: str):
    """img2dataset's `{name}.py`, loaded on its own (not through the package's `__init__`)."""
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("img2dataset is not installed: pip install 'img2dataset==1.47.*'")
    path = os.path.join(list(spec.submodule_search_locations)[0], f"{name}.py")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    module_name = f"clipray_img2dataset_{name}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # enum/pickle look classes up by module name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module_spec.loader.exec_module(module)
    return module


def resizer_class():
    """img2dataset.resizer.Resizer (from the installed img2dataset)."""
    return _module("resizer").Resizer


def blurrer_class():
    """img2dataset.blurrer.BoundingBoxBlurrer: blurs relative [x_min, y_min, x_max, y_max] boxes
    (grown by 10% of the largest box's diagonal, Gaussian blur with a feathered mask), as
    img2dataset does with `bbox_col` (DataComp's face blurring). Each call reseeds numpy's and
    Python's global random generators (img2dataset's way to make the blur deterministic); the
    download path draws from neither."""
    return _module("blurrer").BoundingBoxBlurrer


def is_disallowed(headers, user_agent_token: Optional[str], directives: Iterable[str]) -> bool:
    """True when an `X-Robots-Tag` header opts the response out (img2dataset's rule).

    headers: anything with `get_all(name, default)` (http.client / email messages).
    user_agent_token: lower-case token matched against `X-Robots-Tag: <token>: ...`.
    directives: lower-case directives that opt out (e.g. noai, noimageai, noindex, noimageindex).
    """
    wanted = set(directives)
    for value in headers.get_all("X-Robots-Tag", []) or []:
        parts = value.split(":", 1)
        found = [d.strip().lower() for d in parts[-1].split(",")]
        token = parts[0].lower() if len(parts) == 2 else None
        if (token is None or token == user_agent_token) and any(d in wanted for d in found):
            return True
    return False
