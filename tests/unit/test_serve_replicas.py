"""Production runs at least two Serve replicas, one per Ray node; the local demo keeps one.

CT_SERVE_MIN_REPLICAS / CT_SERVE_MAX_REPLICAS_PER_NODE change the config the deploy task starts
the application from (serve/config.yaml); docker/compose.yaml sets them (tests/deploy checks that).
"""

from __future__ import annotations

from typing import Any

from ray.serve.schema import ServeDeploySchema

from ml.rollout import ServeDeployer
from ml.settings import Settings


def _deployment(config: dict[str, Any]) -> dict[str, Any]:
    return config["applications"][0]["deployments"][0]


def test_the_local_demo_keeps_one_replica_and_no_spread() -> None:
    deployment = _deployment(ServeDeployer(Settings()).build_config(None, "1"))
    assert deployment["autoscaling_config"]["min_replicas"] == 1
    assert "max_replicas_per_node" not in deployment


def test_production_settings_start_two_replicas_on_different_nodes() -> None:
    settings = Settings(serve_min_replicas=2, serve_max_replicas_per_node=1)
    config = ServeDeployer(settings).build_config(None, "1")
    deployment = _deployment(config)
    scaling = deployment["autoscaling_config"]
    assert scaling["min_replicas"] == 2 and scaling["initial_replicas"] >= 2
    assert scaling["max_replicas"] >= scaling["min_replicas"]
    assert deployment["max_replicas_per_node"] == 1
    # what Ray Serve itself accepts
    parsed = ServeDeploySchema.model_validate(config).applications[0].deployments[0]
    assert parsed.max_replicas_per_node == 1
    assert parsed.autoscaling_config["min_replicas"] == 2


def test_more_replicas_than_the_file_allows_raise_its_maximum() -> None:
    scaling = _deployment(ServeDeployer(Settings(serve_min_replicas=3)).build_config(None, "1"))[
        "autoscaling_config"
    ]
    assert scaling["min_replicas"] == scaling["initial_replicas"] == scaling["max_replicas"] == 3
