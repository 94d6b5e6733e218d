"""CT_SERVE_TARGET: the deploy task's two homes for the Serve config.

The local target (the Ray dashboard's Serve REST API) is exercised end to end against a real Ray
cluster in tests/integration/test_serving.py. No Kubernetes runs on these machines, so the
RayService target is checked here against a small HTTP server that answers like the Kubernetes API
for one RayService: the contract under test is ours (path, auth, merge patch, status reading).
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from ml.rollout import CONFIG_FILE, DeployError, RayServiceApi, ServeDeployer, ServeRestApi
from ml.serve_options import ServeOptions
from ml.settings import Settings


def _manifests():
    """tests/deploy/test_k8s_manifests (the manifests' loaders); it needs kubernetes-validate, a
    dev tool the Airflow image's package set (tests/deploy/test_airflow_image_packages.py) lacks."""
    pytest.importorskip("kubernetes_validate")
    from tests.deploy import test_k8s_manifests

    return test_k8s_manifests


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
                seen = {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": body,
                }
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


# ---- staged rollouts on KubeRay: user_config.candidate in serveConfigV2 --------------------------

CANDIDATE = {"model_name": "agnews-classifier", "model_version": "7", "mode": "canary", "fraction": 0.25}
NEWS_CANDIDATE = {"model_version": "4", "mode": "shadow"}


@pytest.fixture
def rayservice_api(k8s_api) -> tuple[FakeRayServiceApi, str]:
    """The fake API holding docker/k8s/rayservice.yaml as `kubectl apply -k` creates it, plus a
    second dataset's application (``news``, at /news) that has a shadow candidate of its own."""
    api, url = k8s_api
    spec = copy.deepcopy(_manifests().one("RayService")["spec"])
    config = yaml.safe_load(spec["serveConfigV2"])
    news = copy.deepcopy(config["applications"][0])
    news.update(name="news", route_prefix="/news")
    news["deployments"][0]["user_config"].update(
        model_name="news-classifier", model_version="3", candidate=dict(NEWS_CANDIDATE)
    )
    config["applications"].append(news)
    api.resource["spec"] = {**spec, "serveConfigV2": yaml.safe_dump(config, sort_keys=False)}
    return api, url


def _running(api: FakeRayServiceApi) -> dict:
    """The RayService's serveConfigV2 as the cluster holds it: a string (the CRD's type) of YAML."""
    text = api.resource["spec"]["serveConfigV2"]
    assert isinstance(text, str)
    return yaml.safe_load(text)


def _user_config(config: dict, app: str) -> dict:
    (entry,) = [a for a in config["applications"] if a["name"] == app]
    return entry["deployments"][0]["user_config"]


def _patches(api: FakeRayServiceApi) -> list[dict]:
    return [r["body"] for r in api.requests if r["method"] == "PATCH"]


def _accepted_by_serve(config: dict) -> None:
    """What KubeRay hands to the Serve controller: Ray Serve's own config schema, and ours for every
    user_config (KubeRay's CRD only says serveConfigV2 is a string; the repo vendors no CRD)."""
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        for deployment in app["deployments"]:
            ServeOptions.model_validate(deployment["user_config"])


def test_a_candidate_patches_only_user_config_candidate_of_our_application(rayservice_api, service_account):
    api, url = rayservice_api
    spec_before = copy.deepcopy(api.resource["spec"])
    deployer = _deployer(url, service_account)
    before = deployer.current_config()

    deployer.apply(deployer.candidate_config(before, CANDIDATE))

    (patch,) = _patches(api)  # a merge patch of serveConfigV2 alone: the rest of the spec is not sent
    assert list(patch) == ["spec"] and list(patch["spec"]) == ["serveConfigV2"]
    assert {k: v for k, v in api.resource["spec"].items() if k != "serveConfigV2"} == {
        k: v for k, v in spec_before.items() if k != "serveConfigV2"
    }
    after = _running(api)
    expected = copy.deepcopy(before)
    _user_config(expected, "classifier")["candidate"] = CANDIDATE
    assert after == expected  # other apps, http_options, every other field of ours: as they were
    assert _user_config(after, "news")["candidate"] == NEWS_CANDIDATE
    _accepted_by_serve(after)
    # against the manifest (what render_serve_config.py wrote), the one new key is all that differs
    ours = {**after, "applications": [a for a in after["applications"] if a["name"] == "classifier"]}
    manifests = _manifests()
    assert manifests.render_module().serve_config_differences(ours, manifests.serve_config_yaml()) == [
        f"applications[0].deployments[0].user_config.candidate: only in the RayService ({CANDIDATE!r})"
    ]


def test_removing_the_candidate_removes_only_that_key(rayservice_api, service_account):
    api, url = rayservice_api
    deployer = _deployer(url, service_account)
    before = deployer.current_config()
    deployer.apply(deployer.candidate_config(before, {**CANDIDATE, "mode": "shadow"}))

    deployer.apply(deployer.candidate_config(deployer.current_config(), None))

    after = _running(api)
    assert "candidate" not in _user_config(after, "classifier")
    assert after == before  # the news application keeps its own candidate
    _accepted_by_serve(after)
    # removing it again changes nothing
    deployer.apply(deployer.candidate_config(deployer.current_config(), None))
    assert _running(api) == before


def test_another_datasets_candidate_is_its_own_applications(rayservice_api, service_account):
    api, url = rayservice_api
    before = _running(api)
    news = _deployer(url, service_account, dataset="news", serve_default_dataset="agnews")
    assert news.app_name == "news"

    news.apply(news.candidate_config(news.current_config(), None))

    after = _running(api)
    assert "candidate" not in _user_config(after, "news")
    expected = copy.deepcopy(before)
    del _user_config(expected, "news")["candidate"]
    assert after == expected  # the classifier application untouched


@pytest.mark.parametrize(
    "candidate",
    [
        {**CANDIDATE, "mode": "blue"},
        {**CANDIDATE, "fraction": 1.5},
        {**CANDIDATE, "model_version": ""},
        {**CANDIDATE, "weight": 0.1},
    ],
)
def test_a_bad_candidate_is_refused_before_the_rayservice_is_patched(
    rayservice_api, service_account, candidate
):
    api, url = rayservice_api
    deployer = _deployer(url, service_account)
    with pytest.raises(ValidationError):  # ServeOptions, before anything is sent
        deployer.candidate_config(deployer.current_config(), candidate)
    assert _patches(api) == []


def test_a_candidate_needs_our_application_running(rayservice_api, service_account):
    api, url = rayservice_api
    other = _deployer(url, service_account, dataset="sports", serve_default_dataset="agnews")
    with pytest.raises(DeployError, match="application 'sports' does not run"):
        other.candidate_config(other.current_config(), CANDIDATE)
    assert _patches(api) == []


@pytest.mark.parametrize("candidate", [CANDIDATE, None])
def test_the_rendered_serve_config_keeps_a_candidate_block(candidate):
    """render_serve_config.py neither drops nor rejects user_config.candidate (set, or null)."""
    manifests = _manifests()
    module = manifests.render_module()
    edited = manifests.serve_config_yaml()
    edited["applications"][0]["deployments"][0]["user_config"]["candidate"] = candidate
    rendered = module.render((manifests.K8S_DIR / "rayservice.yaml").read_text(), edited)
    assert module.check(rendered, edited) == []
    served = module.rayservice_serve_config(rendered)
    assert _user_config(served, "classifier")["candidate"] == candidate
    _accepted_by_serve(served)
