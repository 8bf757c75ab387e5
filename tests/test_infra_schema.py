"""The KubeRay manifests of infra/kuberay against the strict CRDs, their shape (one cluster spec,
one Ray version, autoscaling, GPUs) and kustomize's rendering. No cluster needed."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.kuberay_manifests import (
    CRD_FILES,
    KUBERAY,
    MANIFESTS,
    NETWORK_POLICY,
    RAYJOBS,
    ROOT,
    cluster_spec,
    containers,
    dockerfile_from,
    groups,
    kustomization,
    load,
    validation_errors,
)

INSTANCE = "app.kubernetes.io/instance"


@pytest.fixture(scope="module")
def crds(shared_dir: Path) -> Path:
    folder = shared_dir / "kuberay-crds"
    if not all((folder / f).is_file() for f in CRD_FILES.values()):
        pytest.skip(f"{folder} lacks the KubeRay CRDs ({', '.join(CRD_FILES.values())})")
    return shared_dir


def test_the_folder_has_a_raycluster_and_rayjobs_for_every_stage():
    kinds = {p.name: load(p)["kind"] for p in MANIFESTS}
    assert kinds.get("raycluster.yaml") == "RayCluster"
    assert {p.name for p in RAYJOBS} == {f"rayjob-{s}.yaml" for s in ("pipeline", "train", "tune", "eval")}
    assert all(kinds[p.name] == "RayJob" for p in RAYJOBS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_strict_kuberay_crd(path: Path, crds: Path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    errors = validation_errors(doc, crds)
    assert errors == [], f"{path.name} does not validate:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (
            lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", d["spec"].pop("shutdownAfterJobFinishes")),
            "shutdownAfterJobFinish",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].__setitem__("idleTimeoutSecond", 60),
            "idleTimeoutSecond",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
                "resource", {"limits": {"cpu": "1"}}
            ),
            "resource",
        ),
        (
            lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"].__setitem__(
                "runAsNonroot", True
            ),
            "runAsNonroot",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].__setitem__(
                "automountServiceAccountTokens", False
            ),
            "automountServiceAccountTokens",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"]["volumeMounts"][0].__setitem__(
                "mountpath", "/tmp"
            ),
            "mountpath",
        ),
    ],
    ids=["rayjob-spec", "worker-group", "container", "security-context", "pod-spec", "autoscaler-mount"],
)
def test_a_misspelt_field_fails_strict_validation(mutate, field: str, crds: Path):
    doc = copy.deepcopy(load(KUBERAY / "rayjob-train.yaml"))
    mutate(doc)
    errors = validation_errors(doc, crds)
    assert any(field in e and "Additional properties" in e for e in errors), errors
    # ... which the CRD as published lets through: this is why the test makes it strict.
    assert validation_errors(doc, crds, strict=False) == []


def test_int_or_string_fields_take_integers_and_strings_only(crds: Path):
    doc = copy.deepcopy(load(KUBERAY / "raycluster.yaml"))
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["readinessProbe"] = {"httpGet": {"path": "/", "port": 8265}}
    assert validation_errors(doc, crds) == []
    head["readinessProbe"]["httpGet"]["port"] = "dashboard"
    assert validation_errors(doc, crds) == []
    head["readinessProbe"]["httpGet"]["port"] = [8265]
    assert any("port" in e for e in validation_errors(doc, crds))


def test_pod_template_metadata_stays_open_like_kubernetes_object_meta(crds: Path):
    doc = copy.deepcopy(load(KUBERAY / "raycluster.yaml"))
    doc["spec"]["headGroupSpec"]["template"]["metadata"]["generateName"] = "clipray-"
    assert validation_errors(doc, crds) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gpu_group_asks_for_gpus_and_tolerates_gpu_nodes_and_the_head_has_none(path: Path):
    doc = load(path)
    found = dict(groups(doc))
    assert set(found) == {"head", "cpu", "gpu"}
    gpu_container = found["gpu"]["template"]["spec"]["containers"][0]
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert (
        gpu_container["resources"]["requests"]["nvidia.com/gpu"]
        == gpu_container["resources"]["limits"]["nvidia.com/gpu"]
    )
    tolerations = found["gpu"]["template"]["spec"].get("tolerations", [])
    assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
    for name in ("head", "cpu"):
        container = found[name]["template"]["spec"]["containers"][0]
        for kind in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container["resources"][kind], f"{name} asks for a GPU"
    assert found["head"]["rayStartParams"].get("num-gpus", "0") == "0"
    # The head runs the GCS, the dashboard and the drivers, not tasks.
    assert found["head"]["rayStartParams"].get("num-cpus") == "0"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_worker_groups_autoscale_between_min_and_max_replicas(path: Path):
    doc = load(path)
    assert cluster_spec(doc)["enableInTreeAutoscaling"] is True
    for name, group in groups(doc):
        if name == "head":
            continue
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], f"group {name} cannot scale"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjobs_delete_their_cluster_and_retry(path: Path):
    spec = load(path)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # the submitter expands ${CLIPRAY_BUCKET}
    submitter_env = {e["name"] for e in spec["submitterPodTemplate"]["spec"]["containers"][0].get("env", [])}
    assert "CLIPRAY_BUCKET" in submitter_env


def with_instance(spec: dict, instance: str) -> dict:
    """`spec` with every pod template's app.kubernetes.io/instance label set to `instance`."""
    spec = copy.deepcopy(spec)
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        group["template"]["metadata"]["labels"][INSTANCE] = instance
    return spec


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_clusters_are_the_raycluster_spec_but_for_their_instance_label(path: Path):
    """One cluster shape: a RayJob's cluster is raycluster.yaml's spec, so sizes change in one way.
    Only the instance label differs: networkpolicy.yaml tells the clusters apart by it."""
    job = load(path)
    spec = job["spec"]["rayClusterSpec"]
    instances = {g["template"]["metadata"]["labels"].get(INSTANCE) for _, g in groups(job)}
    assert instances == {job["metadata"]["name"]}, f"{path.name}: pod templates carry {INSTANCE}={instances}"
    submitter = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert submitter.get(INSTANCE) == job["metadata"]["name"]
    assert spec == with_instance(load(KUBERAY / "raycluster.yaml")["spec"], job["metadata"]["name"])


def test_every_ray_cluster_has_its_own_instance_label():
    names = [load(p)["metadata"]["name"] for p in MANIFESTS]
    assert len(set(names)) == len(names)
    for path in MANIFESTS:
        doc = load(path)
        for name, group in groups(doc):
            assert group["template"]["metadata"]["labels"].get(INSTANCE) == doc["metadata"]["name"], (path.name, name)


def test_one_ray_version_everywhere():
    import ray

    pin = re.search(r'"ray\[[^\]]*\]==([0-9.*]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    base = dockerfile_from()
    image_version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+", base).group(1)
    assert re.fullmatch(pin.replace(".", r"\.").replace("*", r"\d+"), image_version), (image_version, pin)
    assert ray.__version__ == image_version
    for path in MANIFESTS:
        assert cluster_spec(load(path))["rayVersion"] == image_version, path.name


def test_kustomization_lists_every_manifest_and_the_network_policy():
    expected = sorted(p.name for p in MANIFESTS + [NETWORK_POLICY])
    assert sorted(kustomization()["resources"]) == expected


def test_every_container_uses_the_image_kustomize_replaces():
    image_name = kustomization()["images"][0]["name"]
    for path in MANIFESTS:
        for where, container, _ in containers(load(path)):
            if "image" in container or not where.endswith("/autoscaler"):
                assert container["image"].split(":")[0] == image_name, f"{where}: {container.get('image')}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_renders_with_the_chosen_image_digest_bucket_and_component_labels(tmp_path: Path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base_image = kustomization()["images"][0]["newName"]  # what the base renders, overlays rename
    digest = "sha256:" + "ab" * 32
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(KUBERAY, overlay)],  # kustomize wants a relative base
                "images": [
                    {"name": base_image, "newName": "registry.test/ml/clipray", "newTag": "9.9.9", "digest": digest}
                ],
                "configMapGenerator": [
                    {
                        "name": "clipray-settings",
                        "behavior": "replace",
                        "literals": ["bucket=my-bucket", "s3_endpoint_url=http://minio:9000"],
                    }
                ],
                "patches": [
                    {
                        "target": {"group": "ray.io", "kind": "RayJob"},
                        "patch": yaml.safe_dump(
                            [
                                {
                                    "op": "replace",
                                    "path": "/spec/rayClusterSpec/workerGroupSpecs/1/maxReplicas",
                                    "value": 32,
                                }
                            ]
                        ),
                    }
                ],
            }
        )
    )
    rendered = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    by_kind: dict[str, list[dict]] = {}
    for doc in yaml.safe_load_all(rendered.stdout):
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert len(by_kind["RayCluster"]) == 1 and len(by_kind["RayJob"]) == 4
    (settings,) = by_kind["ConfigMap"]
    assert settings["metadata"]["name"] == "clipray-settings"  # no hash suffix: CRDs refer to it by name
    assert settings["data"] == {"bucket": "my-bucket", "s3_endpoint_url": "http://minio:9000"}
    assert settings["metadata"]["labels"]["app.kubernetes.io/component"] == "settings"
    for doc in by_kind["RayCluster"] + by_kind["RayJob"]:
        images = {c["image"] for _, c, _ in containers(doc) if "image" in c}
        assert images == {f"registry.test/ml/clipray:9.9.9@{digest}"}, (doc["metadata"]["name"], images)
        assert doc["metadata"]["labels"]["app.kubernetes.io/component"].startswith("ray-")
    assert {d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"] for d in by_kind["RayJob"]} == {32}
    # The NetworkPolicies come through unchanged (kustomize's labels do not touch their selectors)
    # and are applied on their own with `-l app.kubernetes.io/component=network-policy`.
    policies = by_kind["NetworkPolicy"]
    written = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(NETWORK_POLICY.read_text())}
    assert {p["metadata"]["name"]: p["spec"] for p in policies} == written
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in policies} == {"network-policy"}
