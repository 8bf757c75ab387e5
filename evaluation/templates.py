"""Prompt templates and class names for zero-shot classification.

A spec is either a built-in name or a file (local path or fsspec URL):

- templates: `imagenet` (the CLIP paper's 80), `cifar10` / `cifar100` (its 18), `simple`
  (`a photo of a {c}.`); or a `.txt` file with one template per line, or a `.json` file holding
  a list, or a dict keyed by data set name (CLIP_benchmark's custom template files).
- class names: `imagenet`, `cifar10`, `cifar100`; or a `.txt` file with one name per line, or a
  `.json` list / dict keyed by data set name.

In templates `{c}` (CLIP_benchmark) or `{}` (OpenAI's notebooks) stands for the class name.
Lines starting with `#` and blank lines of `.txt` files are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence


from storage import StorageConfig, read_file

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"

BUILTIN_TEMPLATES = {
    "imagenet": "imagenet_templates.txt",
    "imagenet1k": "imagenet_templates.txt",
    "cifar10": "cifar_templates.txt",
    "cifar100": "cifar_templates.txt",
}
BUILTIN_CLASSNAMES = {
    "imagenet": "imagenet_classnames.txt",
    "imagenet1k": "imagenet_classnames.txt",
    "cifar10": "cifar10_classnames.txt",
    "cifar100": "cifar100_classnames.txt",
}
SIMPLE_TEMPLATES = ["a photo of a {c}."]


def _read_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read_list_file(spec: str, what: str, dataset_name: Optional[str], storage: Optional[StorageConfig]) -> list[str]:
    data = read_file(spec, storage)
    if data is None:
        raise FileNotFoundError(f"{what} file {spec} does not exist")
    text = data.decode("utf-8")
    if not spec.lower().endswith(".json"):
        return _read_lines(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {spec} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        if dataset_name is None or dataset_name not in data:
            raise ValueError(
                f"{what} file {spec} is a dict keyed by data set name but eval.dataset_name "
                f"{dataset_name!r} is not one of its keys ({', '.join(sorted(data)[:20])}); set eval.dataset_name"
            )
        data = data[dataset_name]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ValueError(f"{what} file {spec} must hold a JSON list of strings (or a dict of such lists)")
    return [x.strip() for x in data]


def load_templates(
    spec: Optional[str], dataset_name: Optional[str] = None, storage: Optional[StorageConfig] = None
) -> list[str]:
    """Templates for `spec` (built-in name or file); None picks by data set name, else `imagenet`."""
    if spec is None:
        spec = dataset_name if dataset_name in BUILTIN_TEMPLATES else "imagenet"
    if spec == "simple":
        templates = list(SIMPLE_TEMPLATES)
    elif spec in BUILTIN_TEMPLATES:
        templates = _read_lines((PROMPTS_DIR / BUILTIN_TEMPLATES[spec]).read_text(encoding="utf-8"))
    else:
        templates = _read_list_file(spec, "eval.templates", dataset_name, storage)
    check_templates(templates, source=spec)
    return templates


def check_templates(templates: Sequence[str], source: str = "templates") -> None:
    if not templates:
        raise ValueError(f"{source}: no prompt templates (give at least one, e.g. 'a photo of a {{c}}.')")
    for i, template in enumerate(templates):
        if "{c}" not in template and "{}" not in template:
            raise ValueError(
                f"{source}: template {i + 1} {template!r} has no class placeholder; write {{c}} where the class name goes"
            )


def fill_template(template: str, classname: str) -> str:
    """`a photo of a {c}.` + `dog` -> `a photo of a dog.` (`{}` works too); other braces are kept."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    return template.replace("{}", classname)


def load_classnames(
    spec: str, dataset_name: Optional[str] = None, storage: Optional[StorageConfig] = None
) -> list[str]:
    """Class names for `spec` (built-in name or file), in class-index order."""
    if spec in BUILTIN_CLASSNAMES:
        names = _read_lines((PROMPTS_DIR / BUILTIN_CLASSNAMES[spec]).read_text(encoding="utf-8"))
    else:
        names = _read_list_file(spec, "eval.classnames", dataset_name, storage)
    if not names:
        raise ValueError(f"eval.classnames {spec}: the file holds no class names")
    return names
