"""The parts of img2dataset the pipeline reuses: its `Resizer`, and its X-Robots-Tag opt-out rule.

`resizer_class()` loads img2dataset's own `resizer.py` from the installed package, but not the
package's `__init__`, which imports torch, wandb, webdataset and more (about 10 s per download
actor on a small machine) for things the pipeline does not use. Loading it sets
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

_MODULE = "clipray_img2dataset_resizer"


@lru_cache(maxsize=None)
def resizer_class():
    """img2dataset.resizer.Resizer (from the installed img2dataset)."""
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("img2dataset is not installed: pip install 'img2dataset==1.47.*'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "resizer.py")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    module_spec = importlib.util.spec_from_file_location(_MODULE, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_MODULE] = module  # enum/pickle look classes up by module name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module_spec.loader.exec_module(module)
    return module.Resizer


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
