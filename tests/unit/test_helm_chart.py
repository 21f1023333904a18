"""The Helm chart at deploy/helm/turnout, rendered by Helm's own engine.

Rendering goes through helm-python-sdk, a ctypes binding to Helm's Go SDK (v4) shipped in its
wheel, so these are the manifests `helm template` makes, without a helm binary (no package
registry the project uses ships one). Every rendered manifest is checked against the Kubernetes 1.30
schemas bundled by kubernetes-validate (strict: unknown fields fail), except the
ServiceMonitor, a CRD those schemas lack, which gets a structural check of its own. Every
rendered policy goes through `turnout check`, the CLI ops run in their own CI.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm  # helm-python-sdk, a dev dependency
import kubernetes_validate  # a dev dependency
import pytest
import yaml

from gateway.keys import FileKeyStore, hash_secret

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "turnout"
DASHBOARD = REPO / "deploy" / "grafana" / "turnout-dashboard.json"
KUBERNETES = "1.30"
NAMESPACE = "llm"
Manifest = dict[str, Any]


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` laid over `base` as Helm merges values files: maps deeply, lists whole."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def ci_values(**override: Any) -> dict[str, Any]:
    """The chart's ci/test-values.yaml with `override` on top."""
    return merged(yaml.safe_load((CHART / "ci" / "test-values.yaml").read_text()), override)


def render(values: dict[str, Any], release: str = "t") -> list[Manifest]:
    """Every manifest `helm template RELEASE deploy/helm/turnout -n llm` makes with `values`."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=release, namespace=NAMESPACE)
    return [doc for path, text in sorted(files.items()) if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    """The manifest of that kind and name."""
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {[(m['kind'], m['metadata']['name']) for m in manifests]}"
    return found[0]


def kinds(manifests: list[Manifest], kind: str) -> list[Manifest]:
    """Every manifest of that kind."""
    return [m for m in manifests if m["kind"] == kind]


def secret_value(manifests: list[Manifest], name: str, key: str) -> str:
    """One key of a rendered Secret, decoded."""
    return base64.b64decode(one(manifests, "Secret", name)["data"][key]).decode()


def container(workload: Manifest) -> Manifest:
    """A Deployment's or StatefulSet's one container."""
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def policy_of(manifests: list[Manifest], configmap: str) -> dict[str, Any]:
    """The turnout policy a ConfigMap holds, parsed."""
    return yaml.safe_load(one(manifests, "ConfigMap", configmap)["data"]["config.yaml"])


@dataclass(frozen=True)
class Checked:
    """What `turnout check` answered."""

    returncode: int
    stdout: str
    stderr: str


def turnout_check(paths: list[Path], env_names: set[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Checked:
    """`turnout check PATHS` (the CLI's own entry point, in this process: a process each cost
    a second) with the named variables set as the pod sets them, and none of the gateway's
    other ones: an api_key_env the pod does not provide fails the check."""
    from gateway.cli import main

    with monkeypatch.context() as env:
        for name in ("NODE_API_KEY", "TURNOUT_ADMIN_KEY"):
            env.delenv(name, raising=False)
        for name in env_names:
            env.setenv(name, "from-a-secret")
        capsys.readouterr()
        code = main(["check", *map(str, paths)])
        out, err = capsys.readouterr()
    return Checked(code, out, err)


def check_rendered_policies(
    manifests: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> list[Checked]:
    """`turnout check` on the policy of every turnout workload (the gateways, each GPU pool),
    found as the pod finds it: the --config path, the directory mount (never subPath) and
    the ConfigMap behind it; run with the environment the pod gets."""
    results = []
    for workload in kinds(manifests, "Deployment") + kinds(manifests, "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        c = container(workload)
        if "--config" not in c.get("args", []):
            continue  # Redis
        config_path = Path(c["args"][c["args"].index("--config") + 1])
        mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
        assert "subPath" not in mount, "a subPath mount is never updated in place: no hot reload"
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        text = one(manifests, "ConfigMap", volume["configMap"]["name"])["data"][config_path.name]
        target = tmp_path / workload["metadata"]["name"] / config_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        results.append(turnout_check([target], {e["name"] for e in c.get("env", [])}, monkeypatch, capsys))
    assert len(results) == 1 + len(kinds(manifests, "StatefulSet"))
    return results


# -- every variant renders valid Kubernetes and valid turnout policies -------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "ci-values": ci_values(),
    "restart-on-change": ci_values(policyRollout="restart"),
    "external-redis-keys-in-redis": ci_values(
        redis={"enabled": False, "url": "redis://redis.shared:6379/2"},
        gateway={"auth": {"store": "redis", "keysJson": ""}, "adminKey": {"value": ""}},
    ),
    "no-redis-existing-secrets": ci_values(
        redis={"enabled": False},
        gateway={"auth": {"existingSecret": "my-keys", "keysJson": ""}, "adminKey": {"existingSecret": "my-admin", "value": ""}},
        nodeKeys={"existingSecret": "my-node-keys", "apiKey": ""},
        imagePullSecrets=[{"name": "registry"}],
        serviceMonitor={"enabled": False},
        dashboard={"enabled": False},
    ),
    "chart-defaults-plus-keys": {"gateway": {"auth": {"keysJson": '{"keys": []}'}}, "nodeKeys": {"apiKey": "sk-turnout-x"}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_kubernetes_schemas(variant: str) -> None:
    manifests = render(VARIANTS[variant])
    assert {"Deployment", "Service", "ConfigMap", "StatefulSet"} <= {m["kind"] for m in manifests}
    for manifest in manifests:
        if manifest["kind"] == "ServiceMonitor":
            assert_service_monitor_shape(manifest, manifests)
            continue
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_policies_pass_turnout_check(variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for result in check_rendered_policies(render(VARIANTS[variant]), tmp_path, monkeypatch, capsys):
        assert result.returncode == 0, result.stderr
        assert ": ok (" in result.stdout


def test_the_schema_check_can_fail() -> None:
    """Strict schemas: a misspelt field in a rendered manifest is caught."""
    deployment = one(render(ci_values()), "Deployment", "t-turnout-gateway")
    container(deployment)["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"gateway": {"policy": {"limits": {"key": {"rpmm": 600}}}}}, "limits.key.rpmm: Extra inputs are not permitted"),
        ({"gateway": {"policy": {"routes": [{"model": "chat", "backends": ["gpu-9"]}]}}}, "route 'chat' names unknown backends ['gpu-9']"),
        (
            {"gpuNodes": {"pools": [{"name": "gpu", "replicas": 1, "alias": "m", "backend": {"model": "dummy:tiny", "options": {"block_sise": 8}}}]}},
            "backends.0.options.block_sise: Extra inputs are not permitted",
        ),
    ],
    ids=["gateway-field-typo", "route-to-no-node", "node-option-typo"],
)  # fmt: skip
def test_a_broken_policy_override_fails_turnout_check(
    override: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    results = check_rendered_policies(render(ci_values(**override)), tmp_path, monkeypatch, capsys)
    (failed,) = [r for r in results if r.returncode != 0]
    assert failed.returncode == 1 and message in failed.stderr


def test_the_gateway_env_must_provide_the_node_key(tmp_path: Path) -> None:
    """The installed `turnout check` command, run as ops run it: the gateway's policy passes
    with the Deployment's environment and fails without NODE_API_KEY, so the Deployment
    providing it is part of what the passing variants check."""
    manifests = render(ci_values())
    path = tmp_path / "gateway.yaml"
    path.write_text(one(manifests, "ConfigMap", "t-turnout-policy")["data"]["config.yaml"])
    names = {e["name"] for e in container(one(manifests, "Deployment", "t-turnout-gateway"))["env"]}
    env = {k: v for k, v in os.environ.items() if k not in names}
    command = [str(Path(sys.executable).with_name("turnout")), "check", str(path)]
    passed = subprocess.run(command, capture_output=True, text=True, env={**env, **dict.fromkeys(names, "x")}, timeout=60)
    assert passed.returncode == 0, passed.stderr
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 1 and "environment variable NODE_API_KEY (api_key_env) is not set" in failed.stderr


def test_chart_lints_clean() -> None:
    report = helm.lint(CHART, ci_values(), strict=True, kube_version=f"v{KUBERNETES}.0", namespace=NAMESPACE)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


# -- values reach the manifests ------------------------------------------------------------


def test_replicas_pools_and_gpus_flow_into_the_manifests() -> None:
    manifests = render(ci_values(gateway={"replicas": 5}))
    assert one(manifests, "Deployment", "t-turnout-gateway")["spec"]["replicas"] == 5
    pools = {"gpu": (2, 1, "smollm2-135m"), "big": (1, 2, "dummy:llama3-8b")}
    backends = {b["name"]: b for b in policy_of(manifests, "t-turnout-policy")["backends"]}
    for pool, (replicas, gpus, model) in pools.items():
        statefulset = one(manifests, "StatefulSet", f"t-turnout-{pool}")
        assert statefulset["spec"]["replicas"] == replicas
        assert container(statefulset)["resources"]["limits"]["nvidia.com/gpu"] == gpus
        node_policy = policy_of(manifests, f"t-turnout-{pool}-policy")
        assert [(b["kind"], b["model"]) for b in node_policy["backends"]] == [("paged", model)]
        # One remote backend per pod, at the pod's stable DNS name under the headless Service.
        service = one(manifests, "Service", statefulset["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        port = service["spec"]["ports"][0]["port"]
        for i in range(replicas):
            backend = backends.pop(f"{pool}-{i}")
            host = f"t-turnout-{pool}-{i}.{service['metadata']['name']}.{NAMESPACE}.svc"
            assert backend == {"name": f"{pool}-{i}", "kind": "remote", "model": model, "url": f"http://{host}:{port}/v1", "api_key_env": "NODE_API_KEY"}
    assert backends == {}
    routes = {r["model"]: r for r in policy_of(manifests, "t-turnout-policy")["routes"]}
    assert routes["smollm2"]["backends"] == ["gpu-0", "gpu-1"] and routes["smollm2"]["strategy"] == "cache_aware"
    assert routes["llama3"]["backends"] == ["big-0"] and routes["llama3"]["strategy"] == "kv_pressure"


def test_gateway_policy_values_are_kept_and_the_chart_sets_the_rest() -> None:
    extra = {"name": "hosted", "kind": "remote", "model": "gpt-4o-mini", "url": "https://api.example.com/v1"}
    routes = [{"model": "chat", "backends": ["gpu-0", "hosted"], "strategy": "least_load"}]
    manifests = render(ci_values(gateway={"port": 9090, "policy": {"backends": [extra], "routes": routes, "circuit": {"failures": 3}}}))
    policy = policy_of(manifests, "t-turnout-policy")
    assert policy["server"] == {"host": "0.0.0.0", "port": 9090, "admin_key_env": "TURNOUT_ADMIN_KEY", "trusted_proxies": ["10.0.0.0/8"]}
    assert policy["backends"][-1] == extra and policy["routes"] == routes and policy["circuit"] == {"failures": 3}
    assert policy["redis"] == {"url": "redis://t-turnout-redis:6379/0"}
    gateway = container(one(manifests, "Deployment", "t-turnout-gateway"))
    assert gateway["ports"] == [{"name": "http", "containerPort": 9090}]
    redis = one(manifests, "Service", "t-turnout-redis")
    assert redis["spec"]["ports"][0]["port"] == 6379


def test_redis_by_url_or_none() -> None:
    external = render(ci_values(redis={"enabled": False, "url": "redis://shared:6379/1"}))
    assert not [m for m in external if m["metadata"]["name"] == "t-turnout-redis"]
    assert policy_of(external, "t-turnout-policy")["redis"] == {"url": "redis://shared:6379/1"}
    none = render(ci_values(redis={"enabled": False}))
    assert "redis" not in policy_of(none, "t-turnout-policy")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"nodeKeys": {"apiKey": ""}}, "nodeKeys"),
        ({"gateway": {"auth": {"keysJson": ""}}}, "gateway.auth"),
        ({"gateway": {"auth": {"store": "ldap"}}}, "gateway.auth.store must be file or redis"),
        ({"policyRollout": "sometimes"}, "policyRollout must be reload or restart"),
    ],
)  # fmt: skip
def test_missing_keys_and_bad_choices_stop_the_render(override: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(ci_values(**override))


# -- keys as Secrets -----------------------------------------------------------------------


def test_node_key_secret_serves_both_sides(tmp_path: Path) -> None:
    """The gateways send nodeKeys.apiKey; the nodes' keys.json, written by the chart, holds its
    hash in turnout's own key-file form (read back with FileKeyStore), never the key."""
    values = ci_values()
    api_key = values["nodeKeys"]["apiKey"]
    manifests = render(values)
    env = {e["name"]: e for e in container(one(manifests, "Deployment", "t-turnout-gateway"))["env"]}
    ref = env["NODE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret_value(manifests, ref["name"], ref["key"]) == api_key
    keys_json = secret_value(manifests, ref["name"], "keys.json")
    assert api_key not in keys_json
    for statefulset in kinds(manifests, "StatefulSet"):
        pod = statefulset["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == ref["name"]]
        mount = next(m for m in container(statefulset)["volumeMounts"] if m["name"] == volume["name"])
        node_policy = policy_of(manifests, f"{statefulset['metadata']['name']}-policy")
        assert node_policy["auth"] == {"store": "file", "path": f"{mount['mountPath']}/keys.json"}
        assert volume["secret"]["items"] == [{"key": "keys.json", "path": "keys.json"}]
    path = tmp_path / "keys.json"
    path.write_text(keys_json)
    record = FileKeyStore(path).lookup(hash_secret(api_key))
    assert record is not None and record.hint.endswith(api_key[-4:]) and not record.revoked
    assert FileKeyStore(path).lookup(hash_secret(api_key + "x")) is None


def test_client_keys_and_admin_key_come_from_secrets() -> None:
    manifests = render(ci_values())
    deployment = one(manifests, "Deployment", "t-turnout-gateway")
    gateway = container(deployment)
    policy = policy_of(manifests, "t-turnout-policy")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway["env"] if "valueFrom" in e}
    assert secret_value(manifests, env["TURNOUT_ADMIN_KEY"]["name"], "admin-key") == "test-admin-key-not-for-use"
    assert policy["server"]["admin_key_env"] == "TURNOUT_ADMIN_KEY"
    keys = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys")
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "keys")
    assert policy["auth"] == {"store": "file", "path": f"{mount['mountPath']}/keys.json"} and mount["readOnly"]
    assert secret_value(manifests, keys["secret"]["secretName"], "keys.json") == '{"keys": []}'
    # No admin key given: no admin API, and no variable the policy would name.
    bare = render(ci_values(gateway={"adminKey": {"value": ""}}))
    assert "admin_key_env" not in policy_of(bare, "t-turnout-policy")["server"]
    assert "TURNOUT_ADMIN_KEY" not in {e["name"] for e in container(one(bare, "Deployment", "t-turnout-gateway"))["env"]}
    assert "t-turnout-admin" not in {s["metadata"]["name"] for s in kinds(bare, "Secret")}


def test_existing_secrets_are_referenced_not_made() -> None:
    manifests = render(VARIANTS["no-redis-existing-secrets"])
    assert kinds(manifests, "Secret") == []
    deployment = one(manifests, "Deployment", "t-turnout-gateway")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container(deployment)["env"] if "valueFrom" in e}
    assert refs == {"NODE_API_KEY": "my-node-keys", "TURNOUT_ADMIN_KEY": "my-admin"}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "my-keys"
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry"}]


# -- hot reload and rollouts ---------------------------------------------------------------


def pod_annotations(manifests: list[Manifest], kind: str, name: str) -> dict[str, str]:
    """A workload's pod-template annotations."""
    return one(manifests, kind, name)["spec"]["template"]["metadata"].get("annotations") or {}


def test_policy_changes_hot_reload_unless_restart_is_asked_for() -> None:
    """reload (default): no policy checksum on the pods, so `helm upgrade` leaves them running
    and they reload the ConfigMap in place; restart: the checksum rolls exactly the pods whose
    policy changed."""
    tighter = {"gateway": {"policy": {"limits": {"key": {"rpm": 60}}}}}
    for manifests in (render(ci_values()), render(ci_values(**tighter))):
        assert "checksum/policy" not in pod_annotations(manifests, "Deployment", "t-turnout-gateway")
        assert "checksum/policy" not in pod_annotations(manifests, "StatefulSet", "t-turnout-gpu")
        assert policy_of(manifests, "t-turnout-policy")["server"].get("watch_config", True)
    before = render(ci_values(policyRollout="restart"))
    after = render(ci_values(policyRollout="restart", **tighter))
    gateway = [pod_annotations(m, "Deployment", "t-turnout-gateway")["checksum/policy"] for m in (before, after)]
    node = [pod_annotations(m, "StatefulSet", "t-turnout-gpu")["checksum/policy"] for m in (before, after)]
    assert gateway[0] != gateway[1] and node[0] == node[1]
    text = one(after, "ConfigMap", "t-turnout-policy")["data"]["config.yaml"]
    assert gateway[1] == hashlib.sha256(text.removesuffix("\n").encode()).hexdigest()  # the same text, less YAML's final newline


def test_env_secrets_roll_the_gateways_but_client_keys_do_not() -> None:
    """NODE_API_KEY and TURNOUT_ADMIN_KEY are read at start; keys.json is re-read in place."""
    base = pod_annotations(render(ci_values()), "Deployment", "t-turnout-gateway")["checksum/env-secrets"]
    new_node_key = pod_annotations(render(ci_values(nodeKeys={"apiKey": "sk-turnout-rotated"})), "Deployment", "t-turnout-gateway")
    new_client_keys = pod_annotations(render(ci_values(gateway={"auth": {"keysJson": '{"keys": [] }'}})), "Deployment", "t-turnout-gateway")
    assert new_node_key["checksum/env-secrets"] != base
    assert new_client_keys["checksum/env-secrets"] == base


# -- probes, ServiceMonitor, dashboard -------------------------------------------------------


def test_probes_hit_healthz_and_readyz_on_the_served_port() -> None:
    manifests = render(ci_values())
    for workload in [one(manifests, "Deployment", "t-turnout-gateway"), *kinds(manifests, "StatefulSet")]:
        c = container(workload)
        assert [p["name"] for p in c["ports"]] == ["http"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for statefulset in kinds(manifests, "StatefulSet"):  # the first start pulls the model
        assert container(statefulset)["startupProbe"]["httpGet"]["path"] == "/healthz"


def assert_service_monitor_shape(monitor: Manifest, manifests: list[Manifest]) -> None:
    """The ServiceMonitor CRD is not in Kubernetes' schemas: check the fields prometheus-operator
    reads, and that its selector picks the gateway and node Services (not Redis) by a port
    name they have."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert monitor["metadata"]["name"] and monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]
    assert set(selector) <= {"matchLabels", "matchExpressions"}
    assert all(e["operator"] == "In" and set(e) == {"key", "operator", "values"} for e in selector.get("matchExpressions", []))

    def selects(service: Manifest) -> bool:
        labels = service["metadata"]["labels"]
        if not selector["matchLabels"].items() <= labels.items():
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))

    selected = [s for s in kinds(manifests, "Service") if selects(s)]
    components = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected}
    assert components == {"gateway", "gpu-node"}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["path"] == "/metrics" and re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint.get("interval", "30s"))
        assert all(endpoint["port"] in [p["name"] for p in s["spec"]["ports"]] for s in selected)


def test_service_monitor_is_off_by_default_and_on_in_the_test_values() -> None:
    defaults = render(VARIANTS["chart-defaults-plus-keys"])
    assert kinds(defaults, "ServiceMonitor") == []
    (monitor,) = kinds(render(ci_values()), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_dashboard_configmap_is_the_one_dashboard_file() -> None:
    """deploy/grafana/turnout-dashboard.json is the only copy: the chart holds a symlink."""
    link = CHART / "dashboards" / "turnout.json"
    assert link.is_symlink() and link.resolve() == DASHBOARD.resolve()
    (dashboard,) = [m for m in kinds(render(ci_values()), "ConfigMap") if m["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["turnout.json"]) == json.loads(DASHBOARD.read_text())
