"""Static checks of the Kubernetes / KubeRay manifests in docker/k8s/ (no cluster, no services).

Standard objects are validated against the Kubernetes JSON schemas bundled with
``kubernetes-validate`` (strict: unknown fields fail). KubeRay's CRD schemas are not available
offline, so the pod templates inside the RayCluster and RayService are validated as Kubernetes
PodTemplateSpecs and their Ray-specific fields are checked here field by field.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from ml.settings import Settings
from tests.deploy import requirement_pin

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "docker" / "k8s"
NAMESPACE = "ct"
# Files in docker/k8s/ that are YAML but not Kubernetes objects to apply.
NOT_OBJECTS = {"kustomization.yaml", "airflow-values.yaml"}
# Object files that kustomization.yaml must not list (copied, filled in and applied by hand).
TEMPLATES = {"secret.example.yaml"}
PROJECT_IMAGES = {"ct-ray", "ct-mlflow", "ct-airflow"}
# Upstream images a manifest may use besides the project's own (none so far).
ALLOWED_UPSTREAM_IMAGES: set[str] = set()
RAY_KINDS = {"RayCluster", "RayService"}
# spec.upgradeStrategy.type values the KubeRay operator accepts (its RayService validation).
RAYSERVICE_UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
# CT_* variables the code reads from the environment itself, not through ml.settings.Settings:
# name -> the file that reads it (checked, so the list cannot outlive the code).
DIRECT_CT_VARIABLES = {
    "CT_SERVE_API_TOKEN": "serve/app.py",
    # defaults of scheduled training runs, read by the DAG file itself
    "CT_TRAIN_USE_GPU": "dags/continuous_training.py",
    "CT_TRAIN_NUM_WORKERS": "dags/continuous_training.py",
}
# Kubernetes versions to validate against: the oldest we support and the newest bundled schemas.
K8S_VERSIONS = sorted({"1.30", kubernetes_validate.latest_version().rsplit(".", 1)[0]})
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")


# ---- loading ----------------------------------------------------------------------------------


@cache
def documents(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc is not None)


def yaml_files() -> list[str]:
    return sorted(path.name for path in K8S_DIR.glob("*.yaml"))


def object_files() -> list[str]:
    return [name for name in yaml_files() if name not in NOT_OBJECTS]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in object_files() for doc in documents(name)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for _, doc in all_objects()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) of a RayCluster or RayService."""
    spec = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
    yield "headGroupSpec", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{group['groupName']}]", group["template"]


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (and init container) anywhere below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def image_name(image: str) -> str:
    """``registry/repo:tag@digest`` -> ``registry/repo``."""
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return image[: len(image) - len(last)] + last.split(":", 1)[0]


@cache
def render_module() -> ModuleType:
    path = K8S_DIR / "render_serve_config.py"
    spec = importlib.util.spec_from_file_location("render_serve_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def serve_config_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())


def validate(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {path}: {error.message}")


def as_pod_template(where: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where}, "template": template}


# ---- every file -------------------------------------------------------------------------------


def test_every_yaml_file_parses_into_named_objects():
    expected = {"namespace.yaml", "settings.yaml", "raycluster-train.yaml", "rayservice.yaml"}
    assert set(object_files()) >= expected
    for name in yaml_files():
        docs = documents(name)
        assert docs, f"{name} is empty"
        if name in NOT_OBJECTS:
            continue
        for doc in docs:
            missing = [key for key in ("apiVersion", "kind") if not doc.get(key)]
            assert not missing, f"{name}: a document without {missing}"
            assert (doc.get("metadata") or {}).get("name"), f"{name}: a {doc['kind']} without metadata.name"
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, f"{name}: {doc['kind']}"


def test_kustomization_applies_every_manifest_but_the_templates():
    kustomization = documents("kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    expected = sorted(set(object_files()) - TEMPLATES)
    assert sorted(kustomization["resources"]) == expected
    assert not [doc for name in expected for doc in documents(name) if doc["kind"] == "Secret"], (
        "Secrets belong in secret.example.yaml (a template), not in what `kubectl apply -k` applies"
    )
    retargeted = {entry["name"] for entry in kustomization["images"]}
    used = {image_name(c["image"]) for name in expected for doc in documents(name) for c in containers(doc)}
    assert used <= retargeted, f"images not retargetable in kustomization.yaml: {sorted(used - retargeted)}"
    assert retargeted <= PROJECT_IMAGES


def test_secret_template_holds_placeholders_and_the_real_file_is_ignored():
    secrets = documents("secret.example.yaml")
    assert {doc["kind"] for doc in secrets} == {"Secret"}
    assert {doc["metadata"]["name"] for doc in secrets} >= {"ct-secrets", "ray-auth"}
    for doc in secrets:
        assert "data" not in doc, "use stringData with placeholders, never base64 values"
        for key, value in doc["stringData"].items():
            assert "change-me" in value, f"{doc['metadata']['name']}.{key} is not an obvious placeholder"
    ignored = (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "docker/k8s/secret.yaml" in ignored


# ---- Kubernetes schemas -----------------------------------------------------------------------


def standard_objects() -> list[Any]:
    return [
        pytest.param(doc, id=f"{name}:{doc['kind']}/{doc['metadata']['name']}")
        for name, doc in all_objects()
        if doc["kind"] not in RAY_KINDS
    ]


def ray_pod_templates() -> list[Any]:
    return [
        pytest.param(where, template, id=f"{doc['kind']}/{doc['metadata']['name']}:{where}")
        for _, doc in all_objects()
        if doc["kind"] in RAY_KINDS
        for where, template in pod_templates(doc)
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", standard_objects())
def test_standard_objects_match_the_kubernetes_schema(doc: dict[str, Any], version: str):
    validate(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "template"), ray_pod_templates())
def test_ray_pod_templates_match_the_kubernetes_schema(where: str, template: dict[str, Any], version: str):
    validate(as_pod_template(where, template), version)


def test_the_schema_check_rejects_unknown_fields():
    """The two tests above are only worth something if a typo fails them."""
    where, template = next(iter(pod_templates(one("RayService"))))
    broken = copy.deepcopy(template)
    broken["spec"]["containers"][0]["envFormm"] = broken["spec"]["containers"][0].pop("envFrom")
    with pytest.raises(kubernetes_validate.ValidationError, match="envFormm"):
        kubernetes_validate.validate(as_pod_template(where, broken), K8S_VERSIONS[-1], strict=True)


# ---- Ray --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RAY_KINDS))
def test_ray_clusters(kind: str):
    doc = one(kind)
    where = f"{kind}/{doc['metadata']['name']}"
    assert doc["apiVersion"] == "ray.io/v1"
    spec = ray_cluster_spec(doc)
    assert spec["rayVersion"] == requirement_pin("ray"), f"{where}: rayVersion is not requirements.txt's ray"
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["autoscalerOptions"]["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth"}, where
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0", f"{where}: work must not land on the head"
    assert head["dashboard-host"] == "0.0.0.0", where

    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"]), f"{where}: duplicate group names"
    assert "gpu" in groups, f"{where}: no gpu worker group"
    for name, group in groups.items():
        replicas = group.get("replicas", 0)
        assert 0 <= group["minReplicas"] <= replicas <= group["maxReplicas"], f"{where} {name}"
        assert isinstance(group["rayStartParams"], dict)
    gpu = groups["gpu"]
    assert gpu["maxReplicas"] >= 1
    (container,) = gpu["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{where}: gpu group without a GPU"
    tolerated = {t.get("key") for t in gpu["template"]["spec"].get("tolerations", [])}
    assert "nvidia.com/gpu" in tolerated, f"{where}: GPU nodes are usually tainted nvidia.com/gpu"
    assert any(
        v.get("name") == "dshm" and v.get("emptyDir", {}).get("medium") == "Memory"
        for v in gpu["template"]["spec"]["volumes"]
    ), f"{where}: no in-memory /dev/shm for NCCL"

    for part, template in pod_templates(doc):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, f"{where} {part}"
        for c in pod["containers"]:
            sources = {(k, v["name"]) for ref in c.get("envFrom", []) for k, v in ref.items()}
            required = {("configMapRef", "ct-settings"), ("secretRef", "ct-secrets")}
            assert sources >= required, f"{where} {part}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, f"{where} {part}"
            resources = c["resources"]
            assert resources["requests"] == resources["limits"], f"{where} {part}: requests != limits"
            for amount in resources["limits"].values():
                assert QUANTITY.match(str(amount)), f"{where} {part}: {amount!r} is not a quantity"


def test_rayservice_upgrade_strategy_is_one_kuberay_knows():
    strategy = one("RayService")["spec"]["upgradeStrategy"]
    assert strategy["type"] in RAYSERVICE_UPGRADE_TYPES


def test_rayservice_runs_serve_config_yaml():
    rayservice = one("RayService")
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    module = render_module()
    differences = module.serve_config_differences(served, serve_config_yaml())
    assert not differences, f"rayservice.yaml is stale, run {module.REGENERATE}: {differences}"
    assert served["http_options"]["host"] == "0.0.0.0"
    assert rayservice["metadata"]["name"] == served["applications"][0]["name"] == "classifier"
    # the script's --check: also the formatting of the generated block
    assert module.check((K8S_DIR / "rayservice.yaml").read_text(), serve_config_yaml()) == []
    assert module.main(["--check"]) == 0


def test_serve_config_comparison_notices_an_edit_of_serve_config_yaml():
    module = render_module()
    manifest = (K8S_DIR / "rayservice.yaml").read_text()
    served = module.rayservice_serve_config(manifest)
    edited = serve_config_yaml()
    edited["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] += 1
    differences = module.serve_config_differences(served, edited)
    assert differences and "max_replicas" in differences[0]
    assert module.check(manifest, edited)
    # ... and a RayService that kept 127.0.0.1, or added a key, is wrong too
    local = copy.deepcopy(served)
    local["http_options"]["host"] = "127.0.0.1"
    local["applications"][0]["extra"] = 1
    assert len(module.serve_config_differences(local, serve_config_yaml())) == 2
    # rendering the edited config fixes the manifest
    assert module.check(module.render(manifest, edited), edited) == []


def test_render_rewrites_only_the_generated_block():
    module = render_module()
    manifest = (K8S_DIR / "rayservice.yaml").read_text()
    stale = manifest.replace("max_batch_size: 16", "max_batch_size: 17")
    assert stale != manifest
    assert module.check(stale, serve_config_yaml())
    assert module.render(stale, serve_config_yaml()) == manifest
    with pytest.raises(module.RenderError):
        module.render(manifest.replace(module.END_MARKER, "# gone"), serve_config_yaml())


# ---- settings, references, images -------------------------------------------------------------


def ct_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bCT_[A-Z0-9_]+", text))


def settings_variables() -> set[str]:
    return {f"CT_{field.upper()}" for field in Settings.model_fields}


def test_configmap_and_env_use_only_settings_fields():
    known = settings_variables() | set(DIRECT_CT_VARIABLES)
    config = one("ConfigMap", "ct-settings")["data"]
    unknown = {key for key in config if key.startswith("CT_")} - known
    assert not unknown, f"ct-settings has CT_ keys that ml.settings.Settings does not read: {sorted(unknown)}"
    env = {e["name"] for _, doc in all_objects() for c in containers(doc) for e in c.get("env", [])}
    values = documents("airflow-values.yaml")[0]
    env |= {e["name"] for e in values.get("env", [])} | {s["envName"] for s in values.get("secret", [])}
    unknown = {name for name in env if name.startswith("CT_")} - known
    assert not unknown, f"env sets CT_ variables that Settings does not read: {sorted(unknown)}"


def test_every_ct_name_in_docker_k8s_exists():
    """Secrets, comments and the README too: Settings fields, or read by the code directly."""
    for name, reader in DIRECT_CT_VARIABLES.items():
        assert name in (REPO_ROOT / reader).read_text(), f"{reader} no longer reads {name}"
    allowed = settings_variables() | set(DIRECT_CT_VARIABLES)
    for path in sorted(K8S_DIR.iterdir()):
        if path.suffix in {".yaml", ".md"}:
            unknown = ct_names_in(path.read_text()) - allowed
            assert not unknown, f"{path.name} names unknown settings: {sorted(unknown)}"


def test_settings_point_at_the_objects_defined_here():
    config = one("ConfigMap", "ct-settings")["data"]
    train, service = one("RayCluster"), one("RayService")
    domain = f"{NAMESPACE}.svc.cluster.local"
    assert config["CT_RAY_ADDRESS"] == f"http://{train['metadata']['name']}-head-svc.{domain}:8265"
    port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    assert config["CT_SERVE_URL"] == f"http://{service['metadata']['name']}-serve-svc.{domain}:{port}"
    assert config["CT_SERVE_TARGET"] == "rayservice"
    assert config["CT_RAYSERVICE_NAME"] == service["metadata"]["name"]
    assert config["CT_K8S_NAMESPACE"] == NAMESPACE
    mlflow = one("Service", "mlflow")
    assert config["CT_MLFLOW_TRACKING_URI"] == f"http://mlflow.{domain}:{mlflow['spec']['ports'][0]['port']}"
    assert config["MLFLOW_S3_ENDPOINT_URL"].endswith("://" + config["CT_S3_ENDPOINT"])
    for value in config.values():
        assert isinstance(value, str), f"ConfigMap values must be strings: {value!r}"
    assert Settings(**{k[3:].lower(): v for k, v in config.items() if k.startswith("CT_")})


def test_mlflow_accepts_requests_for_the_tracking_uri():
    """MLflow >= 3.5 refuses Host headers it does not know (matched as in its security_utils)."""
    (server,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    allowed = [host.strip() for host in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    host = urlsplit(one("ConfigMap", "ct-settings")["data"]["CT_MLFLOW_TRACKING_URI"]).netloc
    assert any(fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed)
    assert not any(fnmatch("evil.example.com:5000", pattern) for pattern in allowed if "*" in pattern)


def test_rbac_lets_airflow_patch_the_rayservice():
    service_name = one("RayService")["metadata"]["name"]
    role = one("Role", "ct-rayservice-deployer")
    granted = {
        (resource, verb)
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and service_name in rule.get("resourceNames", [service_name])
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert {("rayservices", "get"), ("rayservices", "patch"), ("rayservices/status", "get")} <= granted
    assert {verb for _, verb in granted} <= {"get", "patch"}, "more than the deploy task needs"
    binding = one("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = one("ServiceAccount")["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding["subjects"]
    values = documents("airflow-values.yaml")[0]
    runner = "scheduler" if values["executor"] == "LocalExecutor" else "workers"  # who runs the tasks
    assert values[runner]["serviceAccount"] == {"create": False, "name": account}


def test_config_and_secret_references_resolve():
    config = one("ConfigMap", "ct-settings")["data"]
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in documents("secret.example.yaml")}
    checked = 0
    for _, doc in all_objects():
        for c in containers(doc):
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] == "ct-settings"
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets
                checked += 1
            for env in c.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    assert source["configMapKeyRef"]["key"] in config, env["name"]
                    checked += 1
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["key"] in secrets[ref["name"]], env["name"]
                    checked += 1
    for doc in (one("RayCluster"), one("RayService")):
        assert ray_cluster_spec(doc)["authOptions"]["secretName"] in secrets
        assert "auth_token" in secrets[ray_cluster_spec(doc)["authOptions"]["secretName"]]
    assert checked > 10
    deployment, service = one("Deployment", "mlflow"), one("Service", "mlflow")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_images_are_the_projects_or_allowed_upstream_ones():
    used = {c["image"] for _, doc in all_objects() for c in containers(doc)}
    assert used, "no container images found"
    values = documents("airflow-values.yaml")[0]
    used.add(values["images"]["airflow"]["repository"])
    for _, doc in all_objects():
        if doc["kind"] in RAY_KINDS and ray_cluster_spec(doc)["autoscalerOptions"].get("image"):
            used.add(ray_cluster_spec(doc)["autoscalerOptions"]["image"])
    unknown = {image_name(image) for image in used} - PROJECT_IMAGES - ALLOWED_UPSTREAM_IMAGES
    assert not unknown, f"images neither the project's nor allowed: {sorted(unknown)}"
    assert {image_name(image) for image in used} >= {"ct-ray", "ct-airflow"}


def test_airflow_values_use_the_settings_and_secrets():
    values = documents("airflow-values.yaml")[0]
    assert values["images"]["airflow"]["repository"] == "ct-airflow"
    assert values["airflowVersion"] == requirement_pin("apache-airflow")
    assert values["executor"] in {"KubernetesExecutor", "LocalExecutor"}
    env_from = yaml.safe_load(values["extraEnvFrom"])  # the chart wants a (templated) string
    sources = {(kind, ref["name"]) for item in env_from for kind, ref in item.items()}
    assert sources >= {("configMapRef", "ct-settings"), ("secretRef", "ct-secrets")}
    assert {"envName": "RAY_AUTH_TOKEN", "secretName": "ray-auth", "secretKey": "auth_token"} in values[
        "secret"
    ]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in values["env"]
    assert values["postgresql"]["enabled"] is False
    assert values["dags"]["persistence"]["enabled"] is False
    assert values["dags"]["gitSync"]["enabled"] is False
    secret_names = {doc["metadata"]["name"] for doc in documents("secret.example.yaml")}
    for key in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName"):
        assert values[key] in secret_names, key
    assert values["data"]["metadataSecretName"] in secret_names


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("ct-ray", "ct-ray"),
        ("reg.io:5000/ct/ct-ray:0.1.0", "reg.io:5000/ct/ct-ray"),
        ("a/b@sha256:00", "a/b"),
    ],
)
def test_image_name(image: str, name: str):
    assert image_name(image) == name
