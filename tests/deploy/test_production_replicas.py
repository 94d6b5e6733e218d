"""The production configs run at least 2 Serve replicas, at most one per node; the demo keeps 1.

- KubeRay: the RayService's serveConfigV2 (rendered from serve/config.yaml) asks for >= 2 replicas
  with ``max_replicas_per_node: 1``; its gpu worker group keeps that many pods, each on its own
  Kubernetes node (required pod anti-affinity on the hostname).
- compose: the deploy task starts the application with CT_SERVE_MIN_REPLICAS >= 2 and
  CT_SERVE_MAX_REPLICAS_PER_NODE = 1, and the stack has that many Ray nodes able to host a replica.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ml.rollout import ServeDeployer
from ml.settings import Settings
from tests.deploy.test_docker import compose
from tests.deploy.test_k8s_manifests import one, ray_cluster_spec, render_module, serve_config_yaml

MIN_REPLICAS = 2


def _replica_floor(deployment: dict[str, Any]) -> int:
    scaling = deployment.get("autoscaling_config")
    return scaling["min_replicas"] if scaling else deployment.get("num_replicas", 1)


def _classifier(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = [a for a in config["applications"] if a["name"] == "classifier"]
    (deployment,) = app["deployments"]
    return deployment


def test_the_local_demo_keeps_one_replica() -> None:
    assert _replica_floor(_classifier(serve_config_yaml())) == 1


def test_the_rayservice_runs_two_replicas_or_more_one_per_node() -> None:
    rayservice = one("RayService")
    deployment = _classifier(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    floor = _replica_floor(deployment)
    assert floor >= MIN_REPLICAS
    assert deployment["max_replicas_per_node"] == 1
    scaling = deployment.get("autoscaling_config") or {}
    assert scaling.get("initial_replicas", floor) >= floor
    # ... and so many nodes that can host one: the head takes none (num-cpus 0)
    spec = ray_cluster_spec(rayservice)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] >= floor and gpu["replicas"] >= floor


def test_the_rayservice_worker_pods_avoid_each_others_nodes() -> None:
    (gpu,) = [g for g in ray_cluster_spec(one("RayService"))["workerGroupSpecs"] if g["groupName"] == "gpu"]
    template = gpu["template"]
    terms = template["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    labels = template["metadata"]["labels"]
    assert any(
        term["topologyKey"] == "kubernetes.io/hostname"
        and term["labelSelector"]["matchLabels"].items() <= labels.items()
        for term in terms
    ), "no required anti-affinity that selects the group's own pods by hostname"


def test_the_render_script_adds_the_production_replicas() -> None:
    """Hand-editing serveConfigV2 is not enough: the next render must keep the replicas."""
    rendered = render_module().expected_serve_config(serve_config_yaml())
    assert _replica_floor(_classifier(rendered)) >= MIN_REPLICAS
    assert _classifier(rendered)["max_replicas_per_node"] == 1
    without = serve_config_yaml()
    assert render_module().serve_config_differences(without, serve_config_yaml())  # 1 replica is stale


def _ray_start_option(command: str, option: str) -> str | None:
    found = re.search(rf"--{option}[= ](\S+)", command)
    return found.group(1) if found else None


def test_compose_starts_two_replicas_or_more_one_per_ray_node() -> None:
    services = compose()["services"]
    env = services["airflow-scheduler"]["environment"]  # the deploy task runs there
    settings = Settings(**{k[3:].lower(): v for k, v in env.items() if k.startswith("CT_SERVE_")})
    deployment = _classifier(ServeDeployer(settings).build_config(None, "1"))
    floor = _replica_floor(deployment)
    assert floor >= MIN_REPLICAS
    assert deployment["max_replicas_per_node"] == 1
    # Ray nodes that can host a replica: the head (if it has the CPUs and the replica wants no
    # GPU) and every GPU worker (all of its box).
    head = services["ray-head"]["command"][-1]
    actor = deployment["ray_actor_options"]
    head_hosts = float(_ray_start_option(head, "num-cpus") or 0) >= actor.get("num_cpus", 1) and float(
        _ray_start_option(head, "num-gpus") or 0
    ) >= actor.get("num_gpus", 0)
    workers = services["ray-gpu-worker"].get("deploy", {}).get("replicas", 1)
    assert int(head_hosts) + workers >= floor, "fewer Ray nodes than replicas: some would never start"
