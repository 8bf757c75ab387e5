"""The files of infra/ and a walk over the pods and containers of KubeRay manifests, for the
tests/test_infra_*.py files; plus the KubeRay CRD schemas made strict, as KubeRay's CI does."""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "infra" / "kuberay"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
LOCK = ROOT / "infra" / "docker" / "requirements.lock"
SUBMIT = ROOT / "infra" / "submit.sh"
KUSTOMIZATION = KUBERAY / "kustomization.yaml"
NETWORK_POLICY = KUBERAY / "networkpolicy.yaml"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# The RayCluster and RayJob manifests (networkpolicy.yaml and kustomization.yaml are not).
MANIFESTS = sorted(p for p in KUBERAY.glob("*.yaml") if p not in (KUSTOMIZATION, NETWORK_POLICY))
RAYJOBS = [p for p in MANIFESTS if p.name.startswith("rayjob-")]
RAY_NODE_COMPONENTS = ("ray-head", "ray-cpu-worker", "ray-gpu-worker")


def load(path: Path) -> dict:
    """The YAML document of `path`, a fresh copy each call (tests mutate them)."""
    return copy.deepcopy(_parsed(path))


@lru_cache(maxsize=None)
def _parsed(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def kustomization() -> dict:
    return load(KUSTOMIZATION)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(doc: dict) -> Iterator[tuple[str, dict]]:
    """(group name, group spec) of the head ('head') and of each worker group."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template with metadata and spec) of every pod the manifest makes."""
    for name, group in groups(doc):
        yield f"{doc['metadata']['name']}/{name}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield f"{doc['metadata']['name']}/submitter", doc["spec"]["submitterPodTemplate"]


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    for where, template in pod_templates(doc):
        yield where, template["spec"]


def autoscaler(doc: dict) -> dict | None:
    """The autoscaler sidecar's options (KubeRay builds a container of the head pod from them)."""
    spec = cluster_spec(doc)
    return spec.get("autoscalerOptions") if spec.get("enableInTreeAutoscaling") else None


def containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, container, its pod spec); the autoscaler's options count as a container of the
    head's pod."""
    for where, pod in pod_specs(doc):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where}/{c['name']}", c, pod
    options = autoscaler(doc)
    if options is not None:
        yield (
            f"{doc['metadata']['name']}/head/autoscaler",
            options,
            cluster_spec(doc)["headGroupSpec"]["template"]["spec"],
        )


def ray_containers(doc: dict) -> Iterator[tuple[str, dict]]:
    for name, group in groups(doc):
        yield f"{doc['metadata']['name']}/{name}", group["template"]["spec"]["containers"][0]


def dockerfile_lines(path: Path = DOCKERFILE) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def dockerfile_from() -> str:
    (base,) = [line.split()[1] for line in dockerfile_lines() if line.upper().startswith("FROM ")]
    return base


def dockerfile_env() -> dict[str, str]:
    """The ENV values the image sets (`ENV A=1 B=2` form)."""
    env = {}
    for line in dockerfile_lines():
        if line.upper().startswith("ENV "):
            for pair in line.split()[1:]:
                name, _, value = pair.partition("=")
                env[name] = value
    return env


# --- the strict CRD schema --------------------------------------------------------------------


def strict_schema(schema: Any, _name: str = "") -> Any:
    """The CRD's openAPIV3Schema made strict, as KubeRay's CI does with kubeconform.

    - every object schema with `properties` and no `x-kubernetes-preserve-unknown-fields: true`
      gets `additionalProperties: false`, except the ObjectMeta of pod templates (`metadata`
      below the top level), which Kubernetes keeps open;
    - `x-kubernetes-int-or-string: true` means "integer or string";
    - `nullable: true` admits null.
    Maps (`additionalProperties: {...}`, e.g. resources limits) stay maps.
    """
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub, name) for name, sub in value.items()}
        elif isinstance(value, (dict, list)):
            out[key] = strict_schema(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    open_by_design = _name == "metadata" or out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and not open_by_design:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_schema(kind: str, shared: Path, strict: bool = True) -> dict:
    if strict:
        return strict_schema(crd_schema(kind, shared, strict=False))
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load((shared / "kuberay-crds" / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=None)
def _validator(kind: str, shared: Path, strict: bool):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(crd_schema(kind, shared, strict))


def validation_errors(doc: dict, shared: Path, strict: bool = True) -> list[str]:
    validator = _validator(doc["kind"], shared, strict)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
