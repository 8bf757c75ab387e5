"""The job config: one YAML file with sections data, model, train, tune, eval, ray.

Each package owns the typed model of its own section; this module only composes them, reads the
YAML, applies `--set dotted.key=value` overrides and turns validation errors into messages that
name the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from evaluation.config import EvalConfig
from pipeline.config import DataConfig
from training.config import ModelConfig, TrainConfig, TuneConfig


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: Optional[str] = Field(None, description="absent: start or join a local cluster")
    num_cpus: Optional[PositiveInt] = Field(
        None, description="logical CPUs of a local cluster (default: max(8, 2 x cores))"
    )
    include_dashboard: bool = Field(
        True,
        description="start Ray's dashboard with a local cluster (http://127.0.0.1:8265); Ray Train "
        "and Ray's state API rely on it",
    )
    shared_filesystem: bool = Field(
        False,
        description="local paths lie on a filesystem every node mounts; without it a cluster of "
        "more than one node refuses local paths (use s3:// and the like)",
    )


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class ConfigError(ValueError):
    """A job config that cannot run; the message names every offending key."""


def _model_at(loc: Iterable[Union[str, int]]) -> Optional[type[BaseModel]]:
    """The pydantic model class that holds the field at `loc` (for typo suggestions)."""
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


# Keys that existed once: a config that still sets one gets what became of it, not a look-alike key.
REMOVED_KEYS = {
    "data.batch_size": "it was removed: nothing read it (the global pass works a whole shard per task; the "
    "CLIP-score batch is data.filters.clip_score.batch_size); delete the key",
}


def _format_error(err: dict[str, Any]) -> str:
    loc = [p for p in err["loc"]]
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden" and key in REMOVED_KEYS:
        return f"unknown key '{key}': {REMOVED_KEYS[key]}"
    if err["type"] == "extra_forbidden":
        parent = _model_at([p for p in loc[:-1]]) or JobConfig
        valid = sorted(parent.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
        return f"unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}"
    value = err.get("input")
    return f"{key} = {value!r}: {err['msg']}"


def validate_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    """Validate a raw dict into a JobConfig or raise ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.batch_size=64` -> (['train', 'batch_size'], 64); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: Union[str, Path]) -> dict[str, Any]:
    try:
        with fsspec.open(str(path), "r") as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return raw


def load_config(
    path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = (), base: Optional[dict[str, Any]] = None
) -> JobConfig:
    """Read YAML (optional), merge it over `base`, apply overrides, validate."""
    raw: dict[str, Any] = _deep_merge(base or {}, read_yaml(path) if path else {})
    apply_overrides(raw, overrides)
    return validate_config(raw, source=str(path) if path else "config")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def describe_keys(sections: Iterable[str]) -> str:
    """One line per config key of `sections`: dotted name, type, default, description (for --help)."""
    lines = []
    for section in sections:
        model = JobConfig.model_fields[section].annotation
        lines.extend(_describe_model(model, section))
    return "\n".join(lines)


def _describe_model(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        nested = _model_at(key.split("."))
        if nested is not None and nested is not model:
            lines.extend(_describe_model(nested, key))
            continue
        default = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}"
        text = f"  {key} ({default})"
        if field.description:
            text += f": {field.description}"
        lines.append(text)
    return lines
