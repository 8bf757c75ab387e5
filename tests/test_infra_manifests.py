"""Static checks of infra/: KubeRay manifests (against the strict CRDs), the Dockerfile, the
dependency lock, .dockerignore, .rayignore and infra/submit.sh. Nothing here needs a cluster,
Docker or the network; the end-to-end runs are in test_infra_cluster.py.
"""
from __future__ import annotations

import copy
import os
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
LOCK = ROOT / "infra" / "docker" / "requirements.lock"
SUBMIT = ROOT / "infra" / "submit.sh"
MANIFESTS = sorted(p for p in KUBERAY.glob("*.yaml") if p.name != "kustomization.yaml")
RAYJOBS = [p for p in MANIFESTS if p.name.startswith("rayjob-")]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MODULES = {"pipeline", "training", "training.tune", "evaluation"}
SUBMIT_COMMANDS = {"pipeline": "pipeline", "train": "training", "tune": "training.tune", "eval": "evaluation"}
S3_SECRET = "clipray-s3"
S3_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
BUCKET_FOR_TESTS = "clipray-test-bucket"


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
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def crds(shared_dir: Path) -> Path:
    folder = shared_dir / "kuberay-crds"
    if not all((folder / f).is_file() for f in CRD_FILES.values()):
        pytest.skip(f"{folder} lacks the KubeRay CRDs ({', '.join(CRD_FILES.values())})")
    return shared_dir


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(doc: dict) -> Iterator[tuple[str, dict]]:
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifest makes."""
    for name, group in groups(doc):
        yield f"{doc['metadata']['name']}/{name}", group["template"]["spec"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield f"{doc['metadata']['name']}/submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, container, its pod spec); the autoscaler sidecar's options count as a container."""
    for where, pod in pod_specs(doc):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where}/{c['name']}", c, pod
    options = cluster_spec(doc).get("autoscalerOptions")
    if cluster_spec(doc).get("enableInTreeAutoscaling") and options is not None:
        yield f"{doc['metadata']['name']}/autoscaler", options, {}


def ray_containers(doc: dict) -> Iterator[tuple[str, dict]]:
    for name, group in groups(doc):
        yield f"{doc['metadata']['name']}/{name}", group["template"]["spec"]["containers"][0]


# --- manifests against the CRDs ---------------------------------------------------------------

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


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", d["spec"].pop("shutdownAfterJobFinishes")),
     "shutdownAfterJobFinish"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].__setitem__("idleTimeoutSecond", 60),
     "idleTimeoutSecond"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
        "resource", {"limits": {"cpu": "1"}}), "resource"),
    (lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"].__setitem__(
        "runAsNonroot", True), "runAsNonroot"),
], ids=["rayjob-spec", "worker-group", "container", "security-context"])
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


# --- what the manifests must say --------------------------------------------------------------

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


@pytest.mark.parametrize("path", MANIFESTS + [KUBERAY / "kustomization.yaml"], ids=lambda p: p.name)
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
                    f"{where}: {env['name']} must come from a Secret, not inline")
    if doc["kind"] == "RayJob":
        runtime_env = doc["spec"].get("runtimeEnvYAML", "")
        assert not re.search(r"AWS_|SECRET|TOKEN|PASSWORD", runtime_env, re.I), (
            f"{path.name}: runtimeEnvYAML must not carry credentials")
        assert "AWS_" not in doc["spec"]["entrypoint"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_container_runs_as_non_root_with_requests_and_limits(path: Path):
    doc = load(path)
    seen = 0
    for where, container, pod in containers(doc):
        seen += 1
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
        assert security.get("runAsUser", 0) != 0, f"{where}: runs as uid 0"
        assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, (
            f"{where}: allowPrivilegeEscalation must be false (the base image's user may sudo)")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(kind, {}))
            assert not missing, f"{where}: resources.{kind} lacks {sorted(missing)}"
    assert seen >= 4  # head, two worker groups, autoscaler (+ submitter)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gpu_group_asks_for_gpus_and_tolerates_gpu_nodes_and_the_head_has_none(path: Path):
    doc = load(path)
    found = dict(groups(doc))
    assert set(found) == {"head", "cpu", "gpu"}
    gpu_container = found["gpu"]["template"]["spec"]["containers"][0]
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu_container["resources"]["requests"]["nvidia.com/gpu"] == gpu_container["resources"]["limits"]["nvidia.com/gpu"]
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


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_clusters_are_the_raycluster_spec(path: Path):
    """One cluster shape: a RayJob's cluster is raycluster.yaml's spec, so sizes change in one way."""
    assert load(path)["spec"]["rayClusterSpec"] == load(KUBERAY / "raycluster.yaml")["spec"]


def test_one_ray_version_everywhere():
    import ray

    pin = re.search(r'"ray\[[^\]]*\]==([0-9.*]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    base = dockerfile_from()
    image_version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+", base).group(1)
    assert re.fullmatch(pin.replace(".", r"\.").replace("*", r"\d+"), image_version), (image_version, pin)
    assert ray.__version__ == image_version
    for path in MANIFESTS:
        assert cluster_spec(load(path))["rayVersion"] == image_version, path.name


def kustomization() -> dict:
    return load(KUBERAY / "kustomization.yaml")


def test_kustomization_lists_every_manifest():
    assert sorted(kustomization()["resources"]) == sorted(p.name for p in MANIFESTS)


def test_every_container_uses_the_image_kustomize_replaces():
    image_name = kustomization()["images"][0]["name"]
    for path in MANIFESTS:
        for where, container, _ in containers(load(path)):
            if "image" in container or not where.endswith("/autoscaler"):
                assert container["image"].split(":")[0] == image_name, f"{where}: {container.get('image')}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_renders_with_the_chosen_image_bucket_and_component_labels(tmp_path: Path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base_image = kustomization()["images"][0]["newName"]  # what the base renders, overlays rename
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBERAY, overlay)],  # kustomize wants a relative base
        "images": [{"name": base_image, "newName": "registry.test/ml/clipray", "newTag": "9.9.9"}],
        "configMapGenerator": [{"name": "clipray-settings", "behavior": "replace",
                                "literals": ["bucket=my-bucket", "s3_endpoint_url=http://minio:9000"]}],
        "patches": [{"target": {"group": "ray.io", "kind": "RayJob"}, "patch": yaml.safe_dump([
            {"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/1/maxReplicas", "value": 32}])}],
    }))
    rendered = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert len(by_kind["RayCluster"]) == 1 and len(by_kind["RayJob"]) == 4
    (settings,) = by_kind["ConfigMap"]
    assert settings["metadata"]["name"] == "clipray-settings"  # no hash suffix: CRDs refer to it by name
    assert settings["data"] == {"bucket": "my-bucket", "s3_endpoint_url": "http://minio:9000"}
    assert settings["metadata"]["labels"]["app.kubernetes.io/component"] == "settings"
    for doc in by_kind["RayCluster"] + by_kind["RayJob"]:
        images = {c["image"] for _, c, _ in containers(doc) if "image" in c}
        assert images == {"registry.test/ml/clipray:9.9.9"}, (doc["metadata"]["name"], images)
        assert doc["metadata"]["labels"]["app.kubernetes.io/component"].startswith("ray-")
    assert {d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"] for d in by_kind["RayJob"]} == {32}


# --- entrypoints and configs ------------------------------------------------------------------

def image_app_dir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/")


def entrypoint_argv(path: Path) -> list[str]:
    """The RayJob's entrypoint as the submitter's shell splits it, with the bucket filled in."""
    entrypoint = load(path)["spec"]["entrypoint"]
    assert "${CLIPRAY_BUCKET}" in entrypoint or "$CLIPRAY_BUCKET" not in entrypoint
    return shlex.split(entrypoint.replace("${CLIPRAY_BUCKET}", BUCKET_FOR_TESTS))


def config_in_repo(config: str) -> Path:
    """A config path of the image (absolute, under its WORKDIR) or of the repo, as a repo file."""
    app = image_app_dir()
    rel = config[len(app) + 1:] if config.startswith(app + "/") else config
    assert not Path(rel).is_absolute(), f"{config} is neither under the image's {app} nor relative"
    return ROOT / rel


def run_python(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_stage_module_answers_help(module: str):
    proc = run_python(["-m", module, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_names_a_module_and_a_config_that_exist_and_validate(path: Path):
    argv = entrypoint_argv(path)
    assert argv[:2] == ["python", "-m"] and argv[2] in MODULES, argv
    assert argv.count("--config") == 1
    config = config_in_repo(argv[argv.index("--config") + 1])
    assert config.is_file(), f"{path.name} names {config.relative_to(ROOT)}, which does not exist"
    # The whole command line, config and --set overrides included, validates without running.
    args = [a if a != argv[argv.index("--config") + 1] else str(config) for a in argv[2:]]
    proc = run_python(["-m", *args, "--print-config"])
    assert proc.returncode == 0, f"{path.name}: {' '.join(argv)}\n{proc.stderr}"
    printed = yaml.safe_load(proc.stdout)
    assert BUCKET_FOR_TESTS in json.dumps(printed), "the bucket override did not reach the config"


def submit_dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(["bash", str(SUBMIT), "--dry-run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**base, **(env or {})})


def rayjob_config(stage: str) -> str:
    argv = entrypoint_argv(KUBERAY / f"rayjob-{stage}.yaml")
    return str(config_in_repo(argv[argv.index("--config") + 1]).relative_to(ROOT))


@pytest.mark.parametrize("command", sorted(SUBMIT_COMMANDS))
def test_submit_sh_runs_the_stage_module_from_the_repo_as_working_dir(command: str):
    config = rayjob_config({"pipeline": "pipeline", "train": "train", "tune": "tune", "eval": "eval"}[command])
    proc = submit_dry_run("--address", "http://127.0.0.1:8265", "--env", "AWS_ENDPOINT_URL=http://127.0.0.1:9000",
                          command, "--config", str(ROOT / config), "--set", "ray.include_dashboard=false")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert argv[argv.index("--working-dir") + 1] == "."
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    entry = argv[argv.index("--") + 1:]
    module = SUBMIT_COMMANDS[command]
    # The config is passed relative to the repository: the job's working dir.
    assert entry == ["python", "-m", module, "--config", config, "--set", "ray.include_dashboard=false"]
    assert (ROOT / config).is_file()


@pytest.mark.parametrize("args, env, message", [
    (["train"], {}, "no cluster address"),
    (["--address", "http://h:8265", "fit"], {}, "unknown COMMAND 'fit'"),
    (["--address", "http://h:8265", "train", "--config", "/etc/hostname"], {}, "outside the repository"),
    (["--address", "http://h:8265", "train", "--config", "configs/no-such.yaml"], {}, "no such file"),
    (["--address", "http://h:8265", "--env", "CLIPRAY_UNSET_VAR", "train"], {}, "is not set"),
    (["--address", "http://h:8265", "--env", "1BAD=x", "train"], {}, "not a variable name"),
], ids=["no-address", "bad-command", "config-outside", "config-missing", "env-unset", "env-bad-name"])
def test_submit_sh_rejects_bad_arguments_with_a_reason(args: list[str], env: dict, message: str):
    proc = submit_dry_run(*args, env=env)
    assert proc.returncode == 2
    assert message in proc.stderr and "infra/submit.sh" in proc.stderr


def test_submit_sh_takes_the_address_from_ray_address_and_passes_s3_configs_through():
    proc = submit_dry_run("eval", "--config", "s3://bucket/eval.yaml", env={"RAY_ADDRESS": "http://10.0.0.1:8265"})
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[argv.index("--address") + 1] == "http://10.0.0.1:8265"
    assert argv[-4:] == ["-m", "evaluation", "--config", "s3://bucket/eval.yaml"]


# --- Docker image -----------------------------------------------------------------------------

def dockerfile_lines() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def dockerfile_from() -> str:
    (base,) = [line.split()[1] for line in dockerfile_lines() if line.upper().startswith("FROM ")]
    return base


def test_dockerfile_starts_from_a_pinned_ray_gpu_image_with_the_projects_python():
    from packaging.specifiers import SpecifierSet

    base = dockerfile_from()
    match = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert match, f"FROM {base}: expected rayproject/ray:X.Y.Z-pyXY-gpu (a pinned GPU tag)"
    python = f"{match.group(4)}.{match.group(5)}"
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert SpecifierSet(requires).contains(f"{python}.0"), f"image Python {python} vs requires-python {requires}"
    # The lock was made on the Python the image runs.
    assert f"on Python {python}," in LOCK.read_text().splitlines()[1]


def test_dockerfile_runs_as_a_non_root_user_from_the_first_install_on():
    lines = dockerfile_lines()
    users = [(i, line.split()[1]) for i, line in enumerate(lines) if line.upper().startswith("USER ")]
    assert users, "no USER: the image would run as whatever the base picked"
    last = users[-1][1].split(":")[0]
    assert last not in ("root", "0"), f"USER {last}"
    first_pip = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert users[0][0] < first_pip and all(u.split(":")[0] not in ("root", "0") for _, u in users)
    for line in lines:
        if line.upper().startswith("COPY"):
            assert "--chown=" in line and "--chown=0" not in line and "--chown=root" not in line, line


def test_dockerfile_installs_pinned_torch_and_dependencies_before_the_source():
    lines = dockerfile_lines()
    text = "\n".join(lines)
    torch_spec = re.search(r'ARG TORCH_SPEC="?(torch==[0-9][^"\s]*)"?', text)
    assert torch_spec, "torch must be pinned (ARG TORCH_SPEC=torch==X.Y.Z)"
    copy_pyproject = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "pyproject.toml" in line)
    copy_lock = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "requirements.lock" in line)
    copy_all = next(i for i, line in enumerate(lines) if re.match(r"COPY\s.*\s\.\s+\.$", line))
    install_lock = next(i for i, line in enumerate(lines) if "pip install" in line and "-r infra/docker/requirements.lock" in line)
    install_project = next(i for i, line in enumerate(lines) if "pip install" in line and re.search(r"\s\.(\s|$)", line))
    assert copy_pyproject < copy_all and copy_lock < install_lock < copy_all < install_project
    assert "${TORCH_SPEC}" in lines[install_project] and "-c infra/docker/requirements.lock" in lines[install_project]


def test_requirements_lock_pins_every_dependency_of_pyproject():
    import importlib.metadata as metadata
    import tomllib

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req in deps:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins  # installed on its own, as the Dockerfile's TORCH_SPEC
            continue
        assert name in pins, f"{req} is missing from {LOCK.relative_to(ROOT)}; rerun infra/docker/lock_requirements.py"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, pyproject wants {req}"
    # Closed: what a pinned package needs (as installed here at that version) is pinned too.
    env = default_environment()
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        for sub in map(Requirement, dist.requires or []):
            if sub.marker is None or sub.marker.evaluate({**env, "extra": ""}):
                sub_name = canonicalize_name(sub.name)
                assert sub_name in pins or sub_name == "torch", f"{name} needs {sub}, which the lock lacks"


def dockerignore_patterns() -> list[str]:
    return [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]


def test_dockerignore_drops_venv_git_data_and_outputs_but_keeps_build_inputs():
    from ray._private.thirdparty.pathspec import PathSpec  # gitwildmatch: close to Docker's rules

    spec = PathSpec.from_lines("gitwildmatch", dockerignore_patterns())
    for dropped in (".venv/bin/python", ".git/HEAD", "demo-run/report.md", "runs/clip/metrics.jsonl",
                    "sweeps/sweep/results.csv", "data/shard-0.parquet", "pipeline/__pycache__/run.cpython-311.pyc"):
        assert spec.match_file(dropped), f".dockerignore lets {dropped} into the build context"
    for kept in ("pyproject.toml", "README.md", "infra/docker/requirements.lock", "configs/eval-imagenet.yaml",
                 "clipray/cli.py", "pipeline/run.py", "training/bpe_simple_vocab_16e6.txt.gz",
                 "training/model/model_configs/ViT-B-32.json", "evaluation/prompts/imagenet_templates.txt"):
        assert not spec.match_file(kept), f".dockerignore drops {kept}, which the image needs"


# --- what `ray job submit --working-dir .` uploads --------------------------------------------

def packaged_files(root: Path, out: Path) -> list[str]:
    """The files Ray would upload for `--working-dir root`, by Ray's own packaging code, with
    .gitignore switched off: .rayignore alone must keep the upload small."""
    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(root), [], str(out), include_gitignore=False)
    with zipfile.ZipFile(out) as zf:
        return [i.filename for i in zf.infolist() if not i.is_dir()]


def test_rayignore_keeps_code_and_configs_and_drops_venv_git_data_and_outputs(tmp_path: Path):
    tree = tmp_path / "repo"
    files = {
        "keep": ["pipeline/run.py", "training/model/model_configs/ViT-B-32.json", "configs/demo.yaml",
                 "training/bpe_simple_vocab_16e6.txt.gz", "clipray/cli.py", "pyproject.toml"],
        "drop": [".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/objects/ab/cdef",
                 "demo-run/pipeline/train/shards/part-0.parquet", "runs/clip/checkpoint_000001/model.pt",
                 "sweeps/sweep/results.csv", "bench-out/bench.json", "data/urls.parquet",
                 "training/__pycache__/loop.cpython-311.pyc", "clipray.egg-info/PKG-INFO",
                 "tests/test_x.py", "final/model.safetensors", "lists/Train_GCC-training.tsv",
                 "data/urls.csv.gz", "benchmarks/results/train_step.jsonl"],
    }
    for rel in files["keep"] + files["drop"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"x")
    shutil.copy(ROOT / ".rayignore", tree / ".rayignore")
    uploaded = set(packaged_files(tree, tmp_path / "pkg.zip"))
    assert set(files["keep"]) <= uploaded
    assert not uploaded & set(files["drop"]), sorted(uploaded & set(files["drop"]))


def test_the_repository_uploads_small_and_complete(tmp_path: Path):
    uploaded = packaged_files(ROOT, tmp_path / "pkg.zip")
    size = (tmp_path / "pkg.zip").stat().st_size
    assert size < 20 * 1024 * 1024, f"the working-dir upload is {size / 2**20:.1f} MiB"
    tops = {name.split("/", 1)[0] for name in uploaded}
    assert {"clipray", "pipeline", "training", "evaluation", "configs", "pyproject.toml"} <= tops
    assert not tops & {".venv", ".git", "demo-run", "runs", "sweeps", "bench-out", "tests"}, tops
    assert not [n for n in uploaded if n.endswith((".parquet", ".pyc", ".safetensors"))]
