"""Pod hardening in infra/kuberay: non-root, read-only root filesystem with explicit writable
emptyDirs, no capabilities, no Kubernetes API token but the autoscaler's, credentials only from
the Secret. Each rule is a function returning what is wrong, so the tests can show that a
manifest breaking it is caught."""

from __future__ import annotations

import copy
import re
from pathlib import Path, PurePosixPath

import pytest

from tests.support.kuberay_manifests import (
    CRD_FILES,
    KUBERAY,
    KUSTOMIZATION,
    MANIFESTS,
    autoscaler,
    cluster_spec,
    containers,
    dockerfile_env,
    groups,
    load,
    pod_specs,
    ray_containers,
)

S3_SECRET = "clipray-s3"
S3_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
API_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Where Ray and clipray write in a Ray container (docs/cluster.md, "Security"): Ray's temp dir,
# the rest of /tmp, the object store, and the caches under ~/.cache (the image's HOME is /home/ray).
RAY_WRITABLE = ("/tmp", "/tmp/ray", "/dev/shm", "/home/ray/.cache")
# Ray's default object store is 30% of the node's memory (Ray docs, "Memory Management").
OBJECT_STORE_FRACTION = 0.3
# Variables the image sets to move a cache into a writable place.
CACHE_VARS = ("MPLCONFIGDIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")


def quantity_bytes(quantity: str | int) -> float:
    """A Kubernetes quantity ('16Gi', '512Mi', '6G', '1000000') in bytes."""
    match = re.fullmatch(r"([0-9.]+)([KMGTP]i?)?", str(quantity))
    assert match, f"not a memory quantity: {quantity!r}"
    number, unit = float(match.group(1)), match.group(2) or ""
    scale = {
        "": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
    }[unit]
    return number * scale


def volumes_by_mount(container: dict, pod: dict) -> dict[str, dict]:
    """{mount path: the pod's volume mounted there} for `container`."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in volumes, f"{container.get('name', 'autoscaler')} mounts {mount['name']}, no such volume"
        out[mount["mountPath"]] = volumes[mount["name"]]
    return out


def writable_at(path: str, mounts: dict[str, dict]) -> bool:
    """Whether `path` lies on a writable emptyDir of `mounts` (the root filesystem is read-only)."""
    target = PurePosixPath(path)
    for mount_path, volume in mounts.items():
        if "emptyDir" in volume and (
            target == PurePosixPath(mount_path) or PurePosixPath(mount_path) in target.parents
        ):
            return True
    return False


def container_problems(where: str, container: dict, pod: dict) -> list[str]:
    security = container.get("securityContext", {})
    merged = {**pod.get("securityContext", {}), **security}
    found = []
    if merged.get("runAsNonRoot") is not True or merged.get("runAsUser", 0) == 0:
        found.append(f"{where}: must run as a non-root uid (runAsNonRoot: true, runAsUser != 0)")
    if security.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation must be false (the base image's user may sudo)")
    if security.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: readOnlyRootFilesystem must be true (writes go to emptyDir mounts)")
    caps = security.get("capabilities", {})
    if "ALL" not in caps.get("drop", []) or caps.get("add"):
        found.append(f"{where}: capabilities must drop ALL and add none")
    if security.get("privileged"):
        found.append(f"{where}: privileged")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(kind, {}))
        if missing:
            found.append(f"{where}: resources.{kind} lacks {sorted(missing)}")
    return found


def hardening_problems(doc: dict) -> list[str]:
    """Everything about `doc`'s pods that breaks the hardening rules, as 'where: what'."""
    found = []
    name = doc["metadata"]["name"]
    for where, pod in pod_specs(doc):
        if pod.get("automountServiceAccountToken") is not False:
            found.append(
                f"{where}: automountServiceAccountToken must be false (no pod here needs the "
                "API but the autoscaler, which gets a projected token)"
            )
        if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            found.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    for where, container, pod in containers(doc):
        found += container_problems(where, container, pod)
        mounts = volumes_by_mount(container, pod)
        for path, volume in mounts.items():
            sources = volume.get("projected", {}).get("sources", [])
            if any("serviceAccountToken" in s for s in sources) and not where.endswith("/autoscaler"):
                found.append(f"{where}: mounts a service account token at {path}; only the autoscaler may")
        if not writable_at("/tmp", mounts):
            found.append(f"{where}: no writable emptyDir at /tmp")
    for group_name, group in groups(doc):
        where, pod = f"{name}/{group_name}", group["template"]["spec"]
        container = pod["containers"][0]
        mounts = volumes_by_mount(container, pod)
        for path in RAY_WRITABLE:
            if not (path in mounts and "emptyDir" in mounts[path]):
                found.append(f"{where}: no emptyDir mounted at {path}")
        for var, value in dockerfile_env().items():
            if var in CACHE_VARS and not writable_at(value, mounts):
                found.append(f"{where}: the image's {var}={value} is not on a writable mount")
        found += shm_problems(where, mounts.get("/dev/shm", {}), container, group["rayStartParams"])
    found += autoscaler_problems(name, doc)
    return found


def shm_problems(where: str, volume: dict, container: dict, ray_start_params: dict) -> list[str]:
    """/dev/shm must be memory, sized for Ray's object store (else Ray refuses to start or falls
    back to disk)."""
    empty_dir = volume.get("emptyDir", {})
    if empty_dir.get("medium") != "Memory" or "sizeLimit" not in empty_dir:
        return [f"{where}: /dev/shm must be an emptyDir with medium Memory and a sizeLimit"]
    memory = quantity_bytes(container["resources"]["limits"]["memory"])
    store = float(ray_start_params.get("object-store-memory", OBJECT_STORE_FRACTION * memory))
    if quantity_bytes(empty_dir["sizeLimit"]) < store:
        return [
            f"{where}: /dev/shm sizeLimit {empty_dir['sizeLimit']} is below the object store ({store / 2**30:.1f} GiB)"
        ]
    return []


def autoscaler_problems(name: str, doc: dict) -> list[str]:
    """The autoscaler needs the API token (projected for it alone) and the head's /tmp/ray."""
    options = autoscaler(doc)
    if options is None:
        return []
    head_pod = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]
    mounts = volumes_by_mount(options, head_pod)
    token = mounts.get(API_TOKEN_DIR, {}).get("projected", {}).get("sources", [])
    found = []
    kinds = {key for source in token for key in source}
    if kinds != {"serviceAccountToken", "configMap", "downwardAPI"}:
        found.append(
            f"{name}/autoscaler: needs the projected token, CA and namespace at {API_TOKEN_DIR} (has {sorted(kinds)})"
        )
    head_mounts = {m["mountPath"]: m["name"] for m in head_pod["containers"][0].get("volumeMounts", [])}
    own = {m["mountPath"]: m["name"] for m in options.get("volumeMounts", [])}
    if own.get("/tmp/ray") is None or own.get("/tmp/ray") != head_mounts.get("/tmp/ray"):
        found.append(f"{name}/autoscaler: must mount the head's /tmp/ray volume (its logs go there)")
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_is_hardened(path: Path):
    doc = load(path)
    assert hardening_problems(doc) == []
    assert len(list(containers(doc))) >= 4  # head, two worker groups, autoscaler (+ submitter)


def _head(d):
    return cluster_spec(d)["headGroupSpec"]["template"]["spec"]


def _worker(d, i=0):
    return cluster_spec(d)["workerGroupSpecs"][i]["template"]["spec"]


def _drop_mount(container: dict, path: str) -> None:
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != path]


MUTATIONS = {
    "writable-root": (
        lambda d: _head(d)["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
        "readOnlyRootFilesystem",
    ),
    "automount": (
        lambda d: _worker(d, 1).__setitem__("automountServiceAccountToken", True),
        "automountServiceAccountToken",
    ),
    "submitter-automount": (
        lambda d: d["spec"]["submitterPodTemplate"]["spec"].pop("automountServiceAccountToken"),
        "submitter: automountServiceAccountToken",
    ),
    "no-tmp": (
        lambda d: _drop_mount(_worker(d)["containers"][0], "/tmp"),
        "cpu/ray-worker: no writable emptyDir at /tmp",
    ),
    "no-cache": (lambda d: _drop_mount(_worker(d, 1)["containers"][0], "/home/ray/.cache"), "/home/ray/.cache"),
    "small-shm": (
        lambda d: _worker(d)["volumes"][-1]["emptyDir"].__setitem__("sizeLimit", "1Gi"),
        "below the object store",
    ),
    "capabilities": (
        lambda d: _head(d)["containers"][0]["securityContext"]["capabilities"].__setitem__("drop", []),
        "capabilities",
    ),
    "escalation": (
        lambda d: cluster_spec(d)["autoscalerOptions"]["securityContext"].__setitem__("allowPrivilegeEscalation", True),
        "autoscaler: allowPrivilegeEscalation",
    ),
    "token-in-ray-head": (
        lambda d: _head(d)["containers"][0]["volumeMounts"].append(
            {"name": "kube-api-access", "mountPath": API_TOKEN_DIR}
        ),
        "ray-head: mounts a service account token",
    ),
    "autoscaler-without-token": (
        lambda d: _drop_mount(cluster_spec(d)["autoscalerOptions"], API_TOKEN_DIR),
        "autoscaler: needs the projected token",
    ),
    "autoscaler-own-logs": (
        lambda d: _drop_mount(cluster_spec(d)["autoscalerOptions"], "/tmp/ray"),
        "autoscaler: must mount the head's /tmp/ray",
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_pod_breaking_a_hardening_rule_is_caught(mutation: str):
    mutate, expected = MUTATIONS[mutation]
    doc = copy.deepcopy(load(KUBERAY / "rayjob-train.yaml"))
    mutate(doc)
    found = hardening_problems(doc)
    assert any(expected in problem for problem in found), found


def test_the_object_store_sizing_reads_object_store_memory_when_set():
    container = {"resources": {"limits": {"memory": "64Gi"}}}
    shm = {"emptyDir": {"medium": "Memory", "sizeLimit": "24Gi"}}
    assert shm_problems("w", shm, container, {}) == []  # 30% of 64 GiB = 19.2 GiB
    assert shm_problems("w", shm, container, {"object-store-memory": str(30 * 2**30)})
    assert quantity_bytes("512Mi") == 512 * 2**20 and quantity_bytes("6G") == 6e9


def test_the_image_moves_its_caches_under_the_writable_cache_folder():
    env = dockerfile_env()
    for var in CACHE_VARS:
        assert env.get(var, "").startswith("/home/ray/.cache/"), f"the Dockerfile must set {var} under ~/.cache"


# --- credentials --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_s3_credentials_come_from_the_secret_on_head_and_workers(path: Path):
    doc = load(path)
    for where, container in ray_containers(doc):
        env = {e["name"]: e for e in container.get("env", [])}
        for var in S3_CREDENTIAL_VARS:
            assert var in env, f"{where}: no {var}"
            ref = env[var].get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": S3_SECRET, "key": var}, f"{where}: {var} must come from Secret {S3_SECRET}"
            assert "value" not in env[var], f"{where}: {var} is inline"


SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)
CREDENTIAL_TEXT = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]|secret_key\s*[:=]", re.I)


@pytest.mark.parametrize("path", MANIFESTS + [KUSTOMIZATION], ids=lambda p: p.name)
def test_no_credentials_inline_or_in_the_runtime_env(path: Path):
    text = path.read_text()
    assert not CREDENTIAL_TEXT.search(text), f"{path.name} holds what looks like a credential"
    doc = load(path)
    if doc.get("kind") not in CRD_FILES:
        return
    for where, container, _ in containers(doc):
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                    f"{where}: {env['name']} must come from a Secret, not inline"
                )
    if doc["kind"] == "RayJob":
        runtime_env = doc["spec"].get("runtimeEnvYAML", "")
        assert not re.search(r"AWS_|SECRET|TOKEN|PASSWORD", runtime_env, re.I), (
            f"{path.name}: runtimeEnvYAML must not carry credentials"
        )
        assert "AWS_" not in doc["spec"]["entrypoint"]
