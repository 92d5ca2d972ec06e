"""deploy/kubernetes, rendered and validated offline: no cluster runs on these machines (no
kube-apiserver, kind, k3s or minikube can be installed), so what is checked is what Kubernetes
would be given. `kubectl kustomize` (kustomize 5.5) renders the base and the overlay with the
in-cluster PostgreSQL; `kubernetes-validate --strict` checks every object against the 1.32
schemas; the tests below check what the deployment relies on in the rendered objects, and
HAProxy's configuration with the real haproxy (`haproxy -c`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

from testkit.haproxy import routing_rules
from testkit.server import ROOT

KUBE = os.path.join(ROOT, "deploy", "kubernetes")
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is missing (it renders the Kustomize base)")
CAPS = ["SETUID", "SETGID", "CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SYS_ADMIN", "NET_ADMIN"]
MAPS = "/usr/local/etc/haproxy/maps"


def render(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", os.path.join(KUBE, path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in objects if o["kind"] == kind])
    return found[0]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render("base")


@pytest.mark.parametrize("path", ["base", "overlays/in-cluster-postgres"])
def test_renders_and_validates_against_the_kubernetes_schemas(path: str, tmp_path: Any) -> None:
    out = subprocess.run(["kubectl", "kustomize", os.path.join(KUBE, path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(out.stdout)
    tool = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    check = subprocess.run([tool, "--strict", "-k", "1.32.0", str(rendered)], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    objects = len([d for d in yaml.safe_load_all(out.stdout) if d])
    assert check.stdout.count(" passed for resource ") == objects, check.stdout


def test_the_namespace_admits_what_the_replicas_need(base: list[dict[str, Any]]) -> None:
    ns = one(base, "Namespace", "kernelpool")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert {o["metadata"].get("namespace") for o in base if o["kind"] != "Namespace"} == {"kernelpool"}


def test_replicas_are_a_statefulset_with_a_volume_each_behind_a_headless_service(base: list[dict[str, Any]]) -> None:
    sts = one(base, "StatefulSet", "kernelpool")
    svc = one(base, "Service", "kernelpool")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"] == sts["spec"]["template"]["metadata"]["labels"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": claim["metadata"]["name"], "mountPath": "/data"}]
    assert not pod.get("volumes"), "no shared volume: each replica's files are on its own claim"
    pdb = one(base, "PodDisruptionBudget", "kernelpool")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"] == sts["spec"]["selector"]


def test_replicas_get_the_privileges_of_the_documented_docker_line_and_no_more(base: list[dict[str, Any]]) -> None:
    pod = one(base, "StatefulSet", "kernelpool")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPS}
    assert "privileged" not in sc and sc["appArmorProfile"] == {"type": "Unconfined"}
    assert pod["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_forward", "value": "1"}]
    from tests.test_docker_image import documented_run_line

    documented = [a.removeprefix("--cap-add=") for a in documented_run_line() if a.startswith("--cap-add=")]
    assert documented == CAPS, documented


def test_replicas_have_probes_resources_and_their_settings(base: list[dict[str, Any]]) -> None:
    (container,) = one(base, "StatefulSet", "kernelpool")["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KERNELPOOL_REPLICA"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    secret = one(base, "Secret", "kernelpool-db")
    assert env["KERNELPOOL_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "url"}
    admin = one(base, "Service", "haproxy-admin")
    assert admin["spec"]["clusterIP"] == "None" and env["KERNELPOOL_HAPROXY_ADMIN"]["value"] == "haproxy-admin:9999"
    assert env["KERNELPOOL_HAPROXY_MAPS"]["value"] == MAPS


def test_haproxy_routes_by_the_user_key_to_a_backend_per_replica(base: list[dict[str, Any]], tmp_path: Any) -> None:
    sts = one(base, "StatefulSet", "kernelpool")
    deployment = one(base, "Deployment", "haproxy")
    config_map = one(base, "ConfigMap", "haproxy-config")
    maps = one(base, "ConfigMap", "haproxy-maps")
    cfg = config_map["data"]["haproxy.cfg"]
    for line in routing_rules(MAPS):
        assert line in cfg.splitlines(), line
    pods = [f"kernelpool-{i}" for i in range(sts["spec"]["replicas"])]
    assert re.findall(r"^backend (\S+)", cfg, re.M) == [*pods, "any"]
    for pod in pods:
        assert f"server {pod} {pod}.{sts['spec']['serviceName']}.kernelpool.svc.cluster.local:8765" in cfg
    pod_spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod_spec["containers"][0]["volumeMounts"]}
    assert volumes[mounts[MAPS]] == maps["metadata"]["name"] and set(maps["data"]) == {"users.map", "tokens.map"}
    assert volumes[mounts["/usr/local/etc/haproxy/haproxy.cfg"]] == config_map["metadata"]["name"]
    policy = one(base, "NetworkPolicy", "haproxy-admin")
    admin_rule = next(r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": 9999}])
    assert admin_rule["from"] == [{"podSelector": {"matchLabels": sts["spec"]["selector"]["matchLabels"]}}]
    if shutil.which("haproxy"):  # the configuration as HAProxy 2.6 reads it (maps in a folder of the test's)
        (tmp_path / "maps").mkdir()
        for name in maps["data"]:
            (tmp_path / "maps" / name).write_text("")
        (tmp_path / "haproxy.cfg").write_text(cfg.replace(MAPS, str(tmp_path / "maps")))
        check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_compose_haproxy_routes_with_the_same_rules(tmp_path: Any) -> None:
    with open(os.path.join(ROOT, "deploy", "compose", "haproxy", "haproxy.cfg")) as f:
        cfg = f.read()
    for line in routing_rules(MAPS):
        assert line in cfg.splitlines(), line
    if shutil.which("haproxy"):
        (tmp_path / "maps").mkdir()
        for name in ("users.map", "tokens.map"):
            (tmp_path / "maps" / name).write_text("")
        (tmp_path / "haproxy.cfg").write_text(cfg.replace(MAPS, str(tmp_path / "maps")))
        check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_overlay_adds_an_in_cluster_postgresql_the_replicas_point_at() -> None:
    objects = render("overlays/in-cluster-postgres")
    pg = one(objects, "StatefulSet", "postgres")
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    svc = one(objects, "Service", "postgres")
    url = one(objects, "Secret", "kernelpool-db")
    import base64

    decoded = base64.b64decode(url["data"]["url"]).decode()
    assert f"@{svc['metadata']['name']}.kernelpool.svc.cluster.local:5432/" in decoded
    (container,) = one(objects, "StatefulSet", "kernelpool")["spec"]["template"]["spec"]["containers"]
    ref = next(e for e in container["env"] if e["name"] == "KERNELPOOL_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert ref["name"] == url["metadata"]["name"]
