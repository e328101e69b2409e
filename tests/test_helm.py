"""The Helm chart, rendered by Helm's own engine and validated against Kubernetes schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from gateway.config import parse_config

CHART = Path(__file__).parent.parent / "helm" / "azure-responses-gateway"
K8S = "1.33.0"


def render(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name="gw", namespace="ai", is_install=True)
    docs: dict[str, dict[str, Any]] = {}
    for text in out.values():
        for doc in yaml.safe_load_all(text):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def all_features() -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / "all-features-values.yaml").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("values", [{}, all_features()], ids=["defaults", "all-features"])
def test_manifests_validate(values: dict[str, Any]) -> None:
    docs = render(values)
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= set(docs)
    # A PodDisruptionBudget only where there is more than one replica (one would block drains).
    assert ("PodDisruptionBudget" in docs) == (values.get("replicaCount", 1) > 1)
    for kind, doc in docs.items():
        if kind == "ServiceMonitor":  # a CRD: no upstream schema; check its shape here
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_defaults_are_secure_and_probed() -> None:
    dep = render({})["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] == 30 + 5 + 5
    assert len(dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]) == 64


def test_all_features() -> None:
    values = all_features()
    docs = render(values)
    ing = docs["Ingress"]["metadata"]["annotations"]
    assert ing["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ing["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert int(ing["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert ing["nginx.ingress.kubernetes.io/proxy-body-size"] == "512m"
    sa = docs["ServiceAccount"]["metadata"]["annotations"]
    assert (
        sa["azure.workload.identity/client-id"]
        == values["serviceAccount"]["workloadIdentityClientId"]
    )
    pod = docs["Deployment"]["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 60 + 10 + 5
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["REDIS_URL"] == {"name": "gateway-redis", "key": "url"}
    assert "replicas" not in docs["Deployment"]["spec"]  # the HPA owns it
    assert docs["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 12
    assert docs["NetworkPolicy"]["spec"]["ingress"][1]["ports"][0]["port"] == 9090
    # the rendered ConfigMap is a config the gateway accepts
    text = docs["ConfigMap"]["data"]["config.yaml"]
    loaded = parse_config(yaml.safe_load(text), {"AOAI_FR_KEY": "k", "REDIS_URL": "redis://r:6379"})
    assert loaded.config.state.backend == "redis" and loaded.config.metrics.port == 9090


def test_default_configmap_is_accepted() -> None:
    text = render({})["ConfigMap"]["data"]["config.yaml"]
    assert parse_config(yaml.safe_load(text), {}).config.server.drain_delay_seconds == 5


def test_config_change_rolls_pods() -> None:
    a = render({})["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = render({"config": {"state": {"backend": "memory", "response_retention_days": 7}}})
    assert b["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != a


def test_cluster_state_renders_to_an_accepted_config() -> None:
    values = {
        "config": {
            "state": {"backend": "redis", "mode": "cluster", "url_env": "REDIS_URL"},
            "audit": {"sinks": [{"type": "redis", "url_env": "REDIS_URL", "mode": "cluster"}]},
        },
        "envFromSecrets": [{"name": "REDIS_URL", "secretName": "gateway-redis", "key": "url"}],
    }
    docs = render(values)
    text = docs["ConfigMap"]["data"]["config.yaml"]
    env = {"REDIS_URL": "rediss://:key@contoso.swedencentral.redis.azure.net:10000/0"}
    loaded = parse_config(yaml.safe_load(text), env)
    assert loaded.config.state.mode == "cluster"
    assert loaded.config.audit.sinks[0].mode == "cluster"
    env_names = [
        e["name"] for e in docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    ]
    assert "REDIS_URL" in env_names


@pytest.mark.parametrize(
    ("values", "renders"),
    [
        ({"replicaCount": 2}, False),
        ({"autoscaling": {"enabled": True}}, False),
        ({"replicaCount": 1}, True),
        ({"replicaCount": 2, "config": {"state": {"backend": "memory"}}}, False),
        (
            {
                "replicaCount": 3,
                "config": {"state": {"backend": "redis", "url_env": "REDIS_URL"}},
                "persistence": {"enabled": False},
            },
            True,
        ),
        (
            {
                "autoscaling": {"enabled": True},
                "config": {"state": {"backend": "redis", "url_env": "REDIS_URL"}},
                "persistence": {"enabled": False},
            },
            True,
        ),
    ],
)
def test_embedded_backends_are_one_replica(values: dict[str, Any], renders: bool) -> None:
    """Several replicas on sqlite (the default) or memory would each keep their own quotas,
    budgets and object ownership (a response made on one pod is 404 on the other): refused
    at render."""
    if renders:
        assert render(values)["Deployment"]
        return
    # Refused by values.schema.json (the template's own `fail` stays behind it).
    with pytest.raises(Exception, match="/config/state/backend") as info:
        render(values)
    assert "redis" in str(info.value)


def test_tmp_holds_spooled_uploads() -> None:
    pod = render({})["Deployment"]["spec"]["template"]["spec"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"]["sizeLimit"] == "2Gi"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"config": {"state": {"backend": "redis"}}}, "missing property 'url_env'"),
        ({"replicaCount": 2}, "/config/state/backend"),  # the state file on two pods
        (  # two pods on one ReadWriteOnce volume
            {"replicaCount": 2, "config": {"state": {"backend": "redis", "url_env": "R"}}},
            "/persistence/enabled",
        ),
        ({"persistence": {"size": "lots"}}, "/persistence/size"),
        ({"autoscaling": {"enabled": True}}, "/config/state/backend"),
        ({"replicaCount": 0}, "/replicaCount"),
        ({"config": {"state": {"backend": "sqlite3"}}}, "/config/state/backend"),
    ],
)
def test_values_the_gateway_would_refuse_fail_the_render(
    values: dict[str, Any], where: str
) -> None:
    """values.schema.json: a bad value fails `helm install/upgrade` with the value's path,
    instead of a pod that crash-loops on a config the gateway refuses."""
    with pytest.raises(Exception) as info:
        render(values)
    assert where in str(info.value)


def test_shared_state_scales() -> None:
    redis = {"backend": "redis", "url_env": "REDIS_URL"}
    docs = render(
        {"replicaCount": 3, "config": {"state": redis}, "persistence": {"enabled": False}}
    )
    assert docs["Deployment"]["spec"]["replicas"] == 3


def test_an_init_container_checks_the_config_with_the_pods_environment() -> None:
    """A config the gateway would refuse fails the new pods' init (the rollout stalls, the
    old pods keep serving), checked with the same environment the gateway gets."""
    pod = render(all_features())["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    main = pod["containers"][0]
    assert init["command"] == ["gateway", "check", "/etc/gateway/config.yaml"]
    assert init["image"] == main["image"] and init["env"] == main["env"]
    assert {"name": "config", "mountPath": "/etc/gateway", "readOnly": True} in init["volumeMounts"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_state_and_audit_live_on_a_volume_claim_by_default() -> None:
    """The default keeps the state file and the audit trail on a PersistentVolumeClaim, so a
    restart, a reschedule or `helm upgrade` forgets nothing; the Deployment recreates its
    pod (a rolling update would wait for the old pod's ReadWriteOnce volume)."""
    docs = render({})
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "storageClassName" not in pvc["spec"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    dep = docs["Deployment"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "data")
    cfg = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"]), {}).config
    assert cfg.state.backend == "sqlite"
    assert cfg.state.path.startswith(mount["mountPath"] + "/")
    assert cfg.audit.path is not None and cfg.audit.path.startswith(mount["mountPath"] + "/")
    kubernetes_validate.validate(pvc, K8S, strict=True)


def test_persistence_options() -> None:
    own = render({"persistence": {"storageClass": "managed-csi-premium", "size": "10Gi"}})
    assert own["PersistentVolumeClaim"]["spec"]["storageClassName"] == "managed-csi-premium"
    assert own["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    existing = render({"persistence": {"existingClaim": "gateway-data"}})
    assert "PersistentVolumeClaim" not in existing
    pod = existing["Deployment"]["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "gateway-data"
    off = render({"persistence": {"enabled": False}})
    assert "PersistentVolumeClaim" not in off and "strategy" not in off["Deployment"]["spec"]
    pod = off["Deployment"]["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["emptyDir"]["sizeLimit"] == "2Gi"
