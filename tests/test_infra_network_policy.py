"""infra/kuberay/networkpolicy.yaml: who may connect to the Ray pods of each cluster.

The policies are read as Kubernetes reads them (a pod selected by an Ingress policy accepts only
what some rule of those policies admits) by the small evaluator below, and checked on the pods
the manifests make: each cluster's pods reach each other on every Ray port; the submitter, labelled
clients and the KubeRay operator reach the head's dashboard (clients also the Ray client port);
nothing else reaches anything.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.support.kuberay_manifests import MANIFESTS, NETWORK_POLICY, RAY_NODE_COMPONENTS, RAYJOBS, groups, load

NAMESPACE = {"kubernetes.io/metadata.name": "ml"}  # where the manifests are applied
OPERATOR_NAMESPACE = {"kubernetes.io/metadata.name": "kuberay"}  # docs/cluster.md installs it there
GCS, DASHBOARD, CLIENT = 6379, 8265, 10001
# Ray's listening ports: the fixed ones, KubeRay's metrics port (8080), the dashboard agent's
# default (52365), the worker port range's ends, and one of the random ports raylets, object
# managers and agents pick when not pinned.
RAY_PORTS = (GCS, DASHBOARD, CLIENT, 8080, 52365, 10002, 19999, 43211)

ALLOWED_KEYS = {
    "spec": {"podSelector", "policyTypes", "ingress", "egress"},
    "rule": {"from", "ports"},
    "peer": {"podSelector", "namespaceSelector", "ipBlock"},
    "port": {"protocol", "port", "endPort"},
    "selector": {"matchLabels", "matchExpressions"},
}


def policies() -> list[dict]:
    return list(yaml.safe_load_all(NETWORK_POLICY.read_text()))


@dataclass
class Pod:
    """A pod as a NetworkPolicy sees it: its labels and its namespace's labels."""

    labels: dict
    namespace: dict = field(default_factory=lambda: dict(NAMESPACE))


def selector_matches(selector: dict, labels: dict) -> bool:
    """Kubernetes' label selector: matchLabels and matchExpressions all hold ({} selects all)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not holds:
            return False
    return True


def peer_admits(peer: dict, source: Pod) -> bool:
    if "ipBlock" in peer:
        return True  # an address range may hold any pod: count it as letting everyone in
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], source.namespace):
            return False
    elif source.namespace != NAMESPACE:
        return False  # a podSelector alone selects pods of the policy's namespace
    return selector_matches(peer.get("podSelector", {}), source.labels)


def port_admits(rule: dict, port: int) -> bool:
    if not rule.get("ports"):
        return True  # no ports: every port
    return any(
        p.get("protocol", "TCP") == "TCP"
        and p.get("port") is not None
        and p["port"] <= port <= p.get("endPort", p["port"])
        for p in rule["ports"]
    )


def allowed(source: Pod, target: Pod, port: int, docs: list[dict]) -> bool:
    """Whether `source` may open a TCP connection to `target`:`port` under the policies `docs`."""
    selecting = [
        d
        for d in docs
        if target.namespace == NAMESPACE
        and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(d["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    return any(
        port_admits(rule, port) and (not rule.get("from") or any(peer_admits(p, source) for p in rule["from"]))
        for d in selecting
        for rule in d["spec"].get("ingress", [])
    )


def ray_pods(doc: dict) -> dict[str, Pod]:
    """{group: its pod} as KubeRay makes it: the template's labels over KubeRay's own (pod.go
    labelPod; KubeRay keeps ray.io/cluster, ray.io/node-type and ray.io/group for itself)."""
    pods = {}
    for name, group in groups(doc):
        kuberay = {
            "ray.io/cluster": f"{doc['metadata']['name']}-x7k2p",
            "ray.io/node-type": "head" if name == "head" else "worker",
            "ray.io/group": "headgroup" if name == "head" else name,
            "app.kubernetes.io/name": "kuberay",
            "app.kubernetes.io/created-by": "kuberay-operator",
        }
        pods[name] = Pod({**kuberay, **group["template"]["metadata"]["labels"]})
    return pods


def instance(doc: dict) -> str:
    return doc["metadata"]["name"]


def client(of: str, component: str = "ray-client") -> Pod:
    return Pod(
        {
            "app.kubernetes.io/name": "clipray",
            "app.kubernetes.io/instance": of,
            "app.kubernetes.io/component": component,
        }
    )


def structure_problems(docs: list[dict]) -> list[str]:
    """Unknown keys (a typo would make Kubernetes reject or ignore a rule), and rules that let in
    more than named pods: no `from`, an empty peer, an ipBlock, a bare namespaceSelector."""
    found = []
    for d in docs:
        name = d.get("metadata", {}).get("name", "?")
        if (d.get("apiVersion"), d.get("kind")) != ("networking.k8s.io/v1", "NetworkPolicy"):
            found.append(f"{name}: not a networking.k8s.io/v1 NetworkPolicy")
        found += [f"{name}: unknown key spec.{k}" for k in set(d["spec"]) - ALLOWED_KEYS["spec"]]
        if d["spec"].get("policyTypes") != ["Ingress"] or "egress" in d["spec"]:
            found.append(f"{name}: policyTypes must be [Ingress] (egress stays open: downloads, S3, the API)")
        selectors = [d["spec"]["podSelector"]]
        for i, rule in enumerate(d["spec"].get("ingress", [])):
            found += [f"{name}: unknown key ingress[{i}].{k}" for k in set(rule) - ALLOWED_KEYS["rule"]]
            if not rule.get("from"):
                found.append(f"{name}: ingress[{i}] has no `from`, so it admits every source")
            for port in rule.get("ports", []):
                found += [f"{name}: unknown key ingress[{i}].ports.{k}" for k in set(port) - ALLOWED_KEYS["port"]]
            for peer in rule.get("from", []):
                found += [f"{name}: unknown key ingress[{i}].from.{k}" for k in set(peer) - ALLOWED_KEYS["peer"]]
                if "ipBlock" in peer:
                    found.append(f"{name}: ingress[{i}] admits an ipBlock {peer['ipBlock'].get('cidr')}")
                if not peer.get("podSelector", {}) and "ipBlock" not in peer:
                    found.append(f"{name}: ingress[{i}] has a peer that admits every pod of a namespace")
                selectors += [peer[k] for k in ("podSelector", "namespaceSelector") if k in peer]
        for selector in selectors:
            found += [f"{name}: unknown selector key {k}" for k in set(selector) - ALLOWED_KEYS["selector"]]
    return found


def test_the_policies_are_well_formed_and_name_their_sources():
    assert structure_problems(policies()) == []
    assert all(d["metadata"]["labels"]["app.kubernetes.io/component"] == "network-policy" for d in policies())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d[1]["spec"]["ingress"][0].pop("from"), "admits every source"),
        (lambda d: d[1]["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}), "0.0.0.0/0"),
        (lambda d: d[1]["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}), "every pod of a namespace"),
        (lambda d: d[0]["spec"].__setitem__("podSelecter", {}), "unknown key spec.podSelecter"),
        (lambda d: d[0]["spec"]["ingress"][0]["from"][0]["podSelector"].__setitem__("matchLabel", {}), "matchLabel"),
    ],
    ids=["no-from", "anywhere", "whole-namespace", "typo", "selector-typo"],
)
def test_a_policy_letting_in_unnamed_sources_is_caught(mutate, expected: str):
    docs = copy.deepcopy(policies())
    mutate(docs)
    assert any(expected in problem for problem in structure_problems(docs)), structure_problems(docs)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_ray_pod_is_isolated_and_reaches_its_own_cluster_on_every_ray_port(path: Path):
    doc, docs = load(path), policies()
    pods = ray_pods(doc)
    ports = set(RAY_PORTS)
    for _, group in groups(doc):
        container = group["template"]["spec"]["containers"][0]
        ports |= {p["containerPort"] for p in container.get("ports", [])}
        ports |= {int(v) for k, v in group["rayStartParams"].items() if k.endswith("-port")}
    for name, target in pods.items():
        assert not allowed(Pod({"app": "other"}), target, GCS, docs), f"{path.name}/{name} is not isolated"
        for source_name, source in pods.items():
            for port in sorted(ports):
                assert allowed(source, target, port, docs), f"{source_name} -> {name}:{port} in {path.name}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_other_clusters_and_other_pods_reach_nothing(path: Path):
    doc, docs = load(path), policies()
    others = [
        Pod({}),
        Pod({"app.kubernetes.io/name": "clipray"}),
        Pod(dict(ray_pods(doc)["head"].labels), {"kubernetes.io/metadata.name": "other"}),
    ]
    for other_path in MANIFESTS:
        if other_path != path:
            others += ray_pods(load(other_path)).values()
            others.append(client(instance(load(other_path))))
    for name, target in ray_pods(doc).items():
        for source in others:
            for port in RAY_PORTS:
                assert not allowed(source, target, port, docs), (source.labels, source.namespace, name, port)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_the_submitter_reaches_only_its_clusters_dashboard(path: Path):
    doc, docs = load(path), policies()
    labels = doc["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    submitter = Pod(dict(labels))
    pods = ray_pods(doc)
    assert allowed(submitter, pods["head"], DASHBOARD, docs)
    for port in set(RAY_PORTS) - {DASHBOARD}:
        assert not allowed(submitter, pods["head"], port, docs), port
    for name in ("cpu", "gpu"):
        assert not any(allowed(submitter, pods[name], port, docs) for port in RAY_PORTS), name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_labelled_clients_and_the_operator_reach_the_head_on_named_ports_only(path: Path):
    doc, docs = load(path), policies()
    head = ray_pods(doc)["head"]
    ray_client = client(instance(doc))
    assert allowed(ray_client, head, DASHBOARD, docs) and allowed(ray_client, head, CLIENT, docs)
    assert not allowed(ray_client, head, GCS, docs)
    assert not allowed(ray_client, ray_pods(doc)["cpu"], CLIENT, docs)
    operator = Pod(
        {"app.kubernetes.io/component": "kuberay-operator", "app.kubernetes.io/name": "kuberay-operator"},
        dict(OPERATOR_NAMESPACE),
    )
    assert allowed(operator, head, DASHBOARD, docs)
    assert not allowed(operator, head, GCS, docs) and not allowed(operator, head, CLIENT, docs)
    # The operator's label on a pod of the Ray namespace is not the operator.
    assert not allowed(Pod(dict(operator.labels)), head, DASHBOARD, docs)


def test_without_the_policies_every_pod_would_be_reachable():
    """The evaluator's baseline: with no policy, Kubernetes lets everything in."""
    head = ray_pods(load(MANIFESTS[0]))["head"]
    assert allowed(Pod({}), head, GCS, [])
    assert not allowed(Pod({}), head, GCS, policies())


def test_a_missing_policy_for_a_cluster_leaves_its_pods_open():
    docs = [d for d in policies() if d["metadata"]["name"] != "clipray-train-ray-nodes"]
    workers = ray_pods(load(next(p for p in RAYJOBS if p.name == "rayjob-train.yaml")))["cpu"]
    assert allowed(Pod({}), workers, GCS, docs)  # what the isolation test above would catch


def test_the_components_the_policies_name_are_the_manifests_components():
    components = {
        g["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for p in MANIFESTS
        for _, g in groups(load(p))
    }
    assert components == set(RAY_NODE_COMPONENTS)
    text = NETWORK_POLICY.read_text()
    assert all(c in text for c in RAY_NODE_COMPONENTS + ("ray-job-submitter", "ray-client"))
