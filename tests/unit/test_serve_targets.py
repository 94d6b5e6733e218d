"""CT_SERVE_TARGET: the deploy task's two homes for the Serve config.

The local target (the Ray dashboard's Serve REST API) is exercised end to end against a real Ray
cluster in tests/integration/test_serving.py. No Kubernetes runs on these machines, so the
RayService target is checked here against a small HTTP server that answers like the Kubernetes API
for one RayService: the contract under test is ours (path, auth, merge patch, status reading).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml.settings import Settings
from serve.deploy import CONFIG_FILE, DeployError, RayServiceApi, ServeDeployer, ServeRestApi

RESOURCE_PATH = "/apis/ray.io/v1/namespaces/ct/rayservices/classifier"


class FakeRayServiceApi:
    """Holds one RayService and records every request made to it."""

    def __init__(self, serve_config: dict[str, Any]) -> None:
        self.resource = {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": {"name": "classifier", "namespace": "ct"},
            "spec": {"serveConfigV2": yaml.safe_dump(serve_config)},
            "status": {
                "activeServiceStatus": {
                    "applicationStatuses": {"classifier": {"status": "RUNNING", "message": ""}}
                }
            },
        }
        self.requests: list[dict[str, Any]] = []
        self.refuse_with: int | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                seen = {"method": self.command, "path": self.path, "headers": dict(self.headers)}
                api.requests.append(seen)
                if api.refuse_with:
                    self._answer(api.refuse_with, {"kind": "Status", "message": "refused"})
                elif self.path != RESOURCE_PATH:
                    self._answer(404, {"kind": "Status", "message": "not found"})
                elif self.command == "PATCH":
                    if self.headers.get("Content-Type") != "application/merge-patch+json":
                        self._answer(415, {"kind": "Status", "message": "unsupported patch type"})
                        return
                    api.resource["spec"].update(body["spec"])
                    self._answer(200, api.resource)
                else:
                    self._answer(200, api.resource)

            do_GET = do_PATCH = _handle

        return Handler


@pytest.fixture
def k8s_api() -> Iterator[tuple[FakeRayServiceApi, str]]:
    api = FakeRayServiceApi(yaml.safe_load(CONFIG_FILE.read_text()))
    server = ThreadingHTTPServer(("127.0.0.1", 0), api.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    (tmp_path / "token").write_text("sa-token-123\n")
    (tmp_path / "namespace").write_text("ct\n")
    return tmp_path


def _deployer(url: str, service_account: Path, **settings: Any) -> ServeDeployer:
    s = Settings(serve_target="rayservice", k8s_api_url=url, **settings)
    return ServeDeployer(s, control=RayServiceApi(s, service_account=service_account))


def test_the_setting_picks_where_the_serve_config_lives(tmp_path: Path) -> None:
    assert isinstance(ServeDeployer(Settings()).control, ServeRestApi)
    control = ServeDeployer(Settings(serve_target="rayservice", k8s_api_url="http://127.0.0.1:8001")).control
    assert isinstance(control, RayServiceApi)
    assert control.url == "http://127.0.0.1:8001/apis/ray.io/v1/namespaces/default/rayservices/classifier"
    with pytest.raises(ValueError, match="serve_target"):
        Settings(serve_target="kubernetes")


def test_outside_a_pod_without_an_api_url_the_error_says_what_to_set(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(DeployError, match="CT_K8S_API_URL"):
        RayServiceApi(Settings(serve_target="rayservice"), service_account=tmp_path)


def test_a_deploy_patches_only_the_model_version_of_the_rayservice(k8s_api, service_account) -> None:
    api, url = k8s_api
    deployer = _deployer(url, service_account)
    before = deployer.current_config()
    assert deployer.app_config(before)["deployments"][0]["user_config"]["model_version"] == "champion"
    assert deployer.app_status() == ("RUNNING", "")

    deployer.apply(deployer.build_config(before, "7"))

    patch = api.requests[-1]
    assert patch["method"] == "PATCH" and patch["path"] == RESOURCE_PATH
    assert patch["headers"]["Authorization"] == "Bearer sa-token-123"  # the pod's service account
    after = yaml.safe_load(api.resource["spec"]["serveConfigV2"])
    old_app, new_app = deployer.app_config(before), deployer.app_config(after)
    assert new_app["deployments"][0]["user_config"]["model_version"] == "7"
    for key in ("import_path", "route_prefix"):
        assert new_app[key] == old_app[key]
    for key in ("autoscaling_config", "ray_actor_options", "max_ongoing_requests"):
        assert new_app["deployments"][0][key] == old_app["deployments"][0][key]
    assert new_app["runtime_env"]["env_vars"]["CT_SERVE_TARGET"] == "rayservice"
    assert "CT_S3_SECRET_KEY" not in new_app["runtime_env"]["env_vars"]  # the pods have their own
    assert deployer.current_config() == after  # rollback puts back what current_config returned


def test_an_upgrade_in_progress_reports_the_pending_cluster(k8s_api, service_account) -> None:
    api, url = k8s_api
    api.resource["status"]["pendingServiceStatus"] = {
        "applicationStatuses": {"classifier": {"status": "DEPLOY_FAILED", "message": "ImportError: x"}}
    }
    assert _deployer(url, service_account).app_status() == ("DEPLOY_FAILED", "ImportError: x")


@pytest.mark.parametrize(
    ("status", "hint"), [(403, "rbac.yaml"), (401, "rbac.yaml"), (404, "kubectl apply -k docker/k8s/")]
)
def test_api_refusals_say_what_to_fix(k8s_api, service_account, status: int, hint: str) -> None:
    api, url = k8s_api
    api.refuse_with = status
    with pytest.raises(DeployError, match=hint.replace(".", r"\.")):
        _deployer(url, service_account).current_config()


def test_a_missing_rayservice_names_namespace_and_name(k8s_api, service_account) -> None:
    _, url = k8s_api
    with pytest.raises(DeployError, match="RayService ct/other not found"):
        _deployer(url, service_account, rayservice_name="other").current_config()


def test_serve_http_host_opens_the_proxy_when_starting_from_the_file() -> None:
    assert ServeDeployer(Settings()).build_config(None, "1")["http_options"]["host"] == "127.0.0.1"
    config = ServeDeployer(Settings(serve_http_host="0.0.0.0")).build_config(None, "1")
    assert config["http_options"]["host"] == "0.0.0.0"
    assert config["http_options"]["port"] == 8000


def test_serve_num_gpus_puts_replicas_on_gpus_when_starting_from_the_file() -> None:
    def gpus(config: dict) -> float:
        return config["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"]

    assert gpus(ServeDeployer(Settings()).build_config(None, "1")) == 0
    started = ServeDeployer(Settings(serve_num_gpus=0.5)).build_config(None, "1")
    assert gpus(started) == 0.5
    # a running application keeps its own resources (edits made with `serve deploy` survive)
    running = ServeDeployer(Settings()).build_config(None, "1")
    assert gpus(ServeDeployer(Settings(serve_num_gpus=1)).build_config(running, "2")) == 0
