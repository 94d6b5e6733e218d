"""Deploy a registered model version to the Ray Serve application, check it, roll back if it fails.

Used by the ``deploy`` and ``smoke_test`` tasks of ``continuous_training`` and by hand::

    python -m serve.deploy --version 3          # or --version champion
    python -m serve.deploy --status

Where the Serve config lives depends on ``CT_SERVE_TARGET``: ``serve-api`` (default; the local
stack and docker compose) changes it through the Ray dashboard's Serve REST API (``PUT
/api/serve/applications/``, what ``serve deploy`` uses); ``rayservice`` (Kubernetes) patches the
``serveConfigV2`` of a KubeRay RayService, which the operator applies to its cluster. Either way
the service itself is checked over HTTP at ``CT_SERVE_URL``, with the same smoke test and rollback.
It imports neither torch nor the model, so it runs in a slim Airflow worker.

A deploy changes only the application's ``user_config`` model (and the ``CT_*`` settings in its
``runtime_env``): replicas load the new model beside the old one and swap in place, so requests
keep being answered. Then it waits until every answer names the new model, and a smoke test
compares the service's predictions with the offline predictions of the same model. If any step
fails, the previous application config is put back, the old model is checked to answer, and
:class:`DeployError` says what failed and what is serving.

A model is identified by **name, version and training run** everywhere here (:class:`ModelId`):
``B`` v2 is not ``A`` v2, and a registry that was recreated reuses version numbers. A replica that
reports a load error for the requested model fails the deploy at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import requests
import yaml

from ml.settings import Settings, is_secret_name, load_settings, settings_env
from serve.schemas import ServeOptions

log = logging.getLogger(__name__)

CONFIG_FILE = Path(__file__).with_name("config.yaml")
APP_NAME = "classifier"
API_TOKEN_ENV = "CT_SERVE_API_TOKEN"
# Texts for a smoke test when there are no offline predictions to compare with.
DEFAULT_SMOKE_TEXTS = [
    "Stocks rallied after the central bank left interest rates unchanged.",
    "The striker scored twice as the home side won the cup final.",
    "A new chip promises faster and cheaper machine learning in data centres.",
    "Leaders met in Geneva to discuss the ceasefire.",
]


class DeployError(RuntimeError):
    """A deploy or smoke test failed; the message says what failed and which version serves."""


@dataclass(frozen=True)
class ModelId:
    """A served model's identity: registered name and version, and the run that trained it.

    ``run_id`` None means "not known" (a caller that only knows name and version): it then matches
    any run. Two known run ids must be equal.
    """

    name: str
    version: str
    run_id: str | None = None

    def matches(self, other: ModelId) -> bool:
        same_run = self.run_id is None or other.run_id is None or self.run_id == other.run_id
        return self.name == other.name and self.version == other.version and same_run

    @property
    def reference(self) -> str:
        """How the Serve app's ``user_config`` names it (``ServeOptions.reference``)."""
        return f"{self.name}@{self.version}"

    def __str__(self) -> str:
        return f"{self.name} v{self.version}" + (f" (run {self.run_id[:8]})" if self.run_id else "")

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ModelId | None:
        if not data:
            return None
        return cls(str(data["name"]), str(data["version"]), data.get("run_id"))


@dataclass(frozen=True)
class Serving:
    """What ``GET /v1/model`` says."""

    model: ModelId
    labels: list[str]
    requested: str | None
    last_load_error: str | None
    failed_request: str | None

    @property
    def version(self) -> str:
        return self.model.version

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Serving:
        return cls(
            ModelId(str(data["name"]), str(data["version"]), data.get("run_id")),
            list(data["labels"]),
            data.get("requested"),
            data.get("last_load_error"),
            data.get("failed_request"),
        )

    def failed_to_load(self, target: ModelId) -> bool:
        """This replica was asked for ``target`` and could not load it (it serves another model)."""
        failed = self.failed_request or (self.requested if self.last_load_error else None)
        return failed == target.reference and not self.model.matches(target)


class ServeRestApi:
    """The Serve config through the Ray dashboard's Serve REST API (local stack, docker compose)."""

    def __init__(self, settings: Settings) -> None:
        self.address = settings.ray_address

    @cached_property
    def _client(self):
        """One client: creating it costs a request (Ray's version check)."""
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        return ServeSubmissionClient(self.address)

    def details(self) -> dict[str, Any]:
        return self._client.get_serve_details()

    def current_config(self) -> dict[str, Any] | None:
        """The whole declarative config now running (every app), or None if Serve runs nothing."""
        details = self.details()
        apps = [app["deployed_app_config"] for app in (details.get("applications") or {}).values()]
        apps = [app for app in apps if app]
        if not apps:
            return None
        config = {"applications": apps}
        if details.get("proxy_location"):
            config["proxy_location"] = details["proxy_location"]
        http = details.get("http_options") or {}
        config["http_options"] = {k: http[k] for k in ("host", "port", "request_timeout_s") if http.get(k)}
        return config

    def apply(self, config: dict[str, Any]) -> None:
        self._client.deploy_applications(config)

    def app_status(self, app_name: str) -> tuple[str, str]:
        app = (self.details().get("applications") or {}).get(app_name)
        if not app:
            return "NOT_STARTED", ""
        return app.get("status", "UNKNOWN"), app.get("message") or ""


class RayServiceApi:
    """The Serve config of a KubeRay RayService (``spec.serveConfigV2``) through the Kubernetes API.

    KubeRay applies a changed ``serveConfigV2`` to the running cluster in place, and Serve replaces
    the replicas one by one, so requests keep being answered. Inside a pod it authenticates with the
    pod's service account, which needs ``get`` and ``patch`` on ``rayservices`` (docker/k8s/rbac.yaml).
    """

    SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

    def __init__(self, settings: Settings, service_account: Path | None = None) -> None:
        self.service_account = service_account or self.SERVICE_ACCOUNT
        self.api_url = (settings.k8s_api_url or self._in_cluster_url()).rstrip("/")
        self.namespace = settings.k8s_namespace or self._pod_namespace()
        self.name = settings.rayservice_name
        self.url = f"{self.api_url}/apis/ray.io/v1/namespaces/{self.namespace}/rayservices/{self.name}"

    def _in_cluster_url(self) -> str:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise DeployError(
                "CT_SERVE_TARGET=rayservice but this is not a Kubernetes pod (no KUBERNETES_SERVICE_HOST): "
                "set CT_K8S_API_URL, e.g. http://127.0.0.1:8001 with `kubectl proxy`"
            )
        return f"https://{host}:{port}"

    def _pod_namespace(self) -> str:
        path = self.service_account / "namespace"
        return path.read_text().strip() if path.exists() else "default"

    def _request(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        token = self.service_account / "token"
        if token.exists():  # read on every call: the kubelet rotates projected tokens
            headers["Authorization"] = f"Bearer {token.read_text().strip()}"
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json"
        ca = self.service_account / "ca.crt"
        verify: bool | str = str(ca) if ca.exists() and self.api_url.startswith("https") else True
        try:
            resp = requests.request(method, self.url, json=body, headers=headers, verify=verify, timeout=30)
        except requests.RequestException as err:
            raise DeployError(f"Kubernetes API {self.api_url} unreachable: {err}") from err
        if resp.status_code == 404:
            raise DeployError(
                f"RayService {self.namespace}/{self.name} not found at {self.api_url}: create it first "
                "(kubectl apply -k docker/k8s/) or set CT_RAYSERVICE_NAME / CT_K8S_NAMESPACE"
            )
        if resp.status_code in {401, 403}:
            raise DeployError(
                f"Kubernetes API refused {method} on RayService {self.namespace}/{self.name} "
                f"(HTTP {resp.status_code}): the service account needs get and patch on rayservices.ray.io "
                f"(docker/k8s/rbac.yaml). {resp.text[:300]}"
            )
        if resp.status_code >= 400:
            raise DeployError(f"{method} {self.url} answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def resource(self) -> dict[str, Any]:
        return self._request("GET")

    def details(self) -> dict[str, Any]:
        return self.resource().get("status") or {}

    def current_config(self) -> dict[str, Any] | None:
        text = (self.resource().get("spec") or {}).get("serveConfigV2")
        config = yaml.safe_load(text) if text else None
        return config if config and config.get("applications") else None

    def apply(self, config: dict[str, Any]) -> None:
        self._request("PATCH", {"spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)}})

    def app_status(self, app_name: str) -> tuple[str, str]:
        """The app's status in the cluster being upgraded to, if any, else in the active one."""
        status = self.details()
        for side in ("pendingServiceStatus", "activeServiceStatus"):
            app = ((status.get(side) or {}).get("applicationStatuses") or {}).get(app_name)
            if app:
                return app.get("status", "UNKNOWN"), app.get("message") or ""
        return "NOT_STARTED", ""


def serve_control(settings: Settings) -> ServeRestApi | RayServiceApi:
    """The Serve config's home for ``CT_SERVE_TARGET``."""
    return RayServiceApi(settings) if settings.serve_target == "rayservice" else ServeRestApi(settings)


class ServeDeployer:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        app_name: str = APP_NAME,
        config_file: Path = CONFIG_FILE,
        timeout_s: float = 600.0,
        poll_s: float = 2.0,
        control: ServeRestApi | RayServiceApi | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.app_name = app_name
        self.config_file = config_file
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.serve_url = self.settings.serve_url.rstrip("/")
        self._control = control

    # ---- the Serve config (CT_SERVE_TARGET) ---------------------------------------------

    @property
    def control(self) -> ServeRestApi | RayServiceApi:
        """Built on first use: constructing the RayService one reads the pod's service account."""
        if self._control is None:
            self._control = serve_control(self.settings)
        return self._control

    def details(self) -> dict[str, Any]:
        return self.control.details()

    def current_config(self) -> dict[str, Any] | None:
        return self.control.current_config()

    def app_config(self, config: dict[str, Any] | None) -> dict[str, Any] | None:
        for app in (config or {}).get("applications", []):
            if app.get("name") == self.app_name:
                return app
        return None

    def apply(self, config: dict[str, Any]) -> None:
        self.control.apply(config)

    def app_status(self) -> tuple[str, str]:
        return self.control.app_status(self.app_name)

    # ---- the service over HTTP ----------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = os.environ.get(API_TOKEN_ENV)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def serving(self) -> Serving | None:
        """What the service answers with now; None when nothing answers."""
        try:
            resp = requests.get(f"{self.serve_url}/v1/model", headers=self._headers(), timeout=10)
        except requests.RequestException:
            return None
        if resp.status_code != 200:
            return None
        return Serving.from_json(resp.json())

    def predict(self, texts: list[str]) -> dict[str, Any]:
        """The pipeline's own request: marked so the drift check leaves it out of the traffic."""
        import uuid

        from serve.prediction_log import PIPELINE_REQUEST_PREFIX

        resp = requests.post(
            f"{self.serve_url}/v1/predict",
            json={"texts": texts, "return_all_scores": True},
            headers={**self._headers(), "X-Request-ID": f"{PIPELINE_REQUEST_PREFIX}{uuid.uuid4().hex}"},
            timeout=60,
        )
        if resp.status_code != 200:
            raise DeployError(f"POST /v1/predict answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    # ---- deploy, verify, roll back ------------------------------------------------------

    def build_config(self, base: dict[str, Any] | None, version: str, model_name: str | None = None) -> dict:
        """``base`` (the running config, or ``serve/config.yaml``) with our app pointed at ``version``."""
        config = copy.deepcopy(base) if base and self.app_config(base) else self._file_config(base)
        app = self.app_config(config)
        deployment = app["deployments"][0]
        user_config = {
            **(deployment.get("user_config") or {}),
            "model_name": model_name or self.settings.registered_model,
            "model_version": str(version),
            "model_path": "",
        }
        ServeOptions.model_validate(user_config)  # refuse a bad config here, not in the replica
        deployment["user_config"] = user_config
        runtime_env = app.setdefault("runtime_env", {}) or {}
        kept = runtime_env.get("env_vars") or {}
        if secrets := sorted(name for name in kept if is_secret_name(name)):
            log.warning(
                "the running application's runtime_env sets %s, which the Ray dashboard shows to all its "
                "users: move them to the Ray nodes' environment (docs/security.md#exposure-and-secrets)",
                ", ".join(secrets),
            )
        runtime_env["env_vars"] = {**kept, **settings_env(self.settings)}
        app["runtime_env"] = runtime_env
        return config

    def _file_config(self, running: dict[str, Any] | None) -> dict[str, Any]:
        config = yaml.safe_load(self.config_file.read_text())
        ours = [app for app in config["applications"] if app["name"] == self.app_name]
        if not ours:
            raise DeployError(f"{self.config_file} has no application named {self.app_name!r}")
        if running:  # other applications keep running as they are
            config["applications"] = [*running["applications"], *ours]
            for key in ("proxy_location", "http_options"):
                if key in running:
                    config[key] = running[key]
        else:
            config["applications"] = ours
            if host := self.settings.serve_http_host:  # in a container: listen beyond loopback
                config["http_options"] = {**(config.get("http_options") or {}), "host": host}
            if (gpus := self.settings.serve_num_gpus) is not None:
                for deployment in ours[0].get("deployments", []):
                    options = deployment.get("ray_actor_options") or {}
                    deployment["ray_actor_options"] = {**options, "num_gpus": gpus}
            minimum, per_node = self.settings.serve_min_replicas, self.settings.serve_max_replicas_per_node
            for deployment in ours[0].get("deployments", []):  # production: >= 2 replicas, one per node
                if minimum is not None and (scaling := deployment.get("autoscaling_config")):
                    deployment["autoscaling_config"] = {
                        **scaling,
                        "min_replicas": minimum,
                        "initial_replicas": max(minimum, scaling.get("initial_replicas") or 0),
                        "max_replicas": max(minimum, scaling.get("max_replicas") or 0),
                    }
                elif minimum is not None:
                    deployment["num_replicas"] = max(minimum, deployment.get("num_replicas") or 1)
                if per_node is not None:
                    deployment["max_replicas_per_node"] = per_node
        return config

    def target(self, version: str | int, model_name: str | None = None, run_id: str | None = None) -> ModelId:
        return ModelId(model_name or self.settings.registered_model, str(version), run_id)

    def deploy(
        self, version: str | int, model_name: str | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        """Point the application at ``model_name`` ``version``; wait until it answers with it; roll
        back on failure. ``run_id`` (the version's training run), when given, must match too.

        Returns ``{"name", "version", "run_id", "previous", "previous_version", "previous_config",
        "seconds"}``: what :meth:`rollback` needs if a later check (the smoke test) fails.
        """
        target = self.target(version, model_name, run_id or self._run_id_of(model_name, version))
        started = time.monotonic()
        previous_config = self.current_config()
        before = self.serving()
        previous = before.model if before else None
        config = self.build_config(previous_config, target.version, target.name)
        log.info(
            "deploying %s to Serve application %r (serving now: %s)",
            target,
            self.app_name,
            previous or "nothing",
        )
        try:
            self.apply(config)
            self.wait_for_model(target)
        except Exception as err:
            self.rollback(previous_config, previous, reason=f"deploy of {target} failed: {err}")
        seconds = round(time.monotonic() - started, 1)
        log.info("%s serves (%.1f s after the deploy started)", target, seconds)
        return {
            **target.to_dict(),
            "previous": previous.to_dict() if previous else None,
            "previous_version": previous.version if previous else None,
            "previous_config": previous_config,
            "seconds": seconds,
        }

    def _run_id_of(self, model_name: str | None, version: str | int) -> str | None:
        """The version's training run from the registry: with it, a reused number is not mistaken."""
        name = model_name or self.settings.registered_model
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self.settings.mlflow_tracking_uri)
            return client.get_model_version(name, str(version)).run_id or None
        except Exception as err:  # the registry is the replicas' source too: they will say more
            log.warning("could not look up the training run of %s v%s: %s", name, version, err)
            return None

    def wait_for_model(self, target: ModelId, replicas_checks: int = 6) -> Serving:
        """Until the app is RUNNING and ``replicas_checks`` answers in a row name ``target``.

        Fails at once when a replica says it could not load ``target``: waiting longer would only
        end in a timeout, and a config left pointing at a broken model takes the service down at
        the next replica restart.
        """
        deadline = time.monotonic() + self.timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            status, message = self.app_status()
            if status in {"DEPLOY_FAILED", "UNHEALTHY"}:
                raise DeployError(f"application {self.app_name!r} is {status}: {message.strip()[:2000]}")
            if status == "RUNNING":
                answers = [self.serving() for _ in range(replicas_checks)]
                if all(a is not None and a.model.matches(target) for a in answers):
                    return answers[0]
                failed = [a for a in answers if a is not None and a.failed_to_load(target)]
                if failed:
                    raise DeployError(
                        f"the replicas could not load {target} and kept {failed[0].model}: "
                        f"{failed[0].last_load_error}"
                    )
                last = ", ".join(str(a.model) if a else "no answer" for a in answers)
            else:
                last = f"application {status}"
            time.sleep(self.poll_s)
        raise DeployError(f"{target} was not serving after {self.timeout_s:.0f} s (last seen: {last})")

    def rollback(
        self, previous_config: dict[str, Any] | None, previous: ModelId | dict | None, reason: str
    ) -> NoReturn:
        """Put ``previous_config`` back, check the old model answers, and raise :class:`DeployError`."""
        if isinstance(previous, dict):
            previous = ModelId.from_dict(previous)
        log.error("%s; rolling back", reason)
        try:
            if previous_config is None or self.app_config(previous_config) is None:
                # nothing served before: take the broken application down rather than leave it half up
                others = [
                    a for a in (previous_config or {}).get("applications", []) if a["name"] != self.app_name
                ]
                self.apply({**(previous_config or {}), "applications": others})
                raise DeployError(f"{reason}. Nothing was serving before; the application was removed.")
            self.apply(previous_config)
            if previous is not None:
                self.wait_for_model(previous)
                self.smoke_test(previous)
        except DeployError:
            raise
        except Exception as err:
            raise DeployError(f"{reason}. ROLLBACK ALSO FAILED: {err}") from err
        raise DeployError(f"{reason}. Rolled back: {previous} is serving and answers.")

    def verify(self, deployed: dict[str, Any], expected: dict[str, Any] | None = None) -> dict[str, Any]:
        """Smoke-test what :meth:`deploy` returned; on failure roll back (raises :class:`DeployError`).

        The ``smoke_test`` task of the DAG and ``python -m serve.deploy`` both end a deploy with it.
        """
        target = ModelId.from_dict(deployed)
        try:
            return self.smoke_test(target, expected)
        except DeployError as err:
            self.rollback(deployed["previous_config"], deployed.get("previous"), reason=str(err))

    def smoke_test(
        self,
        target: ModelId,
        expected: dict[str, Any] | None = None,
        score_tolerance: float = 0.01,
    ) -> dict[str, Any]:
        """Fixed texts must get valid answers from ``target``, equal to ``expected`` if given.

        ``expected`` is the evaluation's smoke set (``texts``, ``labels``, ``scores``): the same
        model's offline predictions. Also checks that a malformed request gets a 4xx, not a 500.
        """
        texts = list(expected["texts"]) if expected else list(DEFAULT_SMOKE_TEXTS)
        info = self.serving()
        if info is None:
            raise DeployError(f"smoke test of {target} failed: GET /v1/model does not answer")
        try:
            answer = self.predict(texts)
        except (DeployError, requests.RequestException) as err:
            raise DeployError(f"smoke test of {target} failed: {err}") from err
        problems = []
        answered = ModelId(
            str(answer["model"]["name"]), str(answer["model"]["version"]), answer["model"].get("run_id")
        )
        if not answered.matches(target):
            problems.append(f"answered by {answered}, not {target}")
        predictions = answer["predictions"]
        if len(predictions) != len(texts):
            problems.append(f"{len(predictions)} predictions for {len(texts)} texts")
        for i, p in enumerate(predictions):
            if p["label"] not in info.labels or not 0.0 <= p["score"] <= 1.0:
                problems.append(f"text {i}: invalid prediction {p}")
            elif abs(sum(p["scores"].values()) - 1.0) > 1e-3:
                problems.append(f"text {i}: class probabilities sum to {sum(p['scores'].values()):.4f}")
        if expected:
            for i, (p, label, score) in enumerate(
                zip(predictions, expected["labels"], expected["scores"], strict=False)
            ):
                if p["label"] != label:
                    problems.append(f"text {i}: served {p['label']!r}, offline {label!r}")
                elif abs(p["score"] - score) > score_tolerance:
                    problems.append(f"text {i}: served score {p['score']:.4f}, offline {score:.4f}")
        bad = requests.post(
            f"{self.serve_url}/v1/predict", json={"texts": []}, headers=self._headers(), timeout=30
        )
        if not 400 <= bad.status_code < 500:
            problems.append(f"an empty request got HTTP {bad.status_code}, expected a 4xx")
        if problems:
            raise DeployError(f"smoke test of {target} failed: " + "; ".join(problems))
        agreed = f", all {len(texts)} agree with the offline predictions" if expected else ""
        log.info("smoke test of %s passed: %d texts answered%s", target, len(texts), agreed)
        return {**target.to_dict(), "texts": len(texts), "compared_offline": bool(expected)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--version", help="version number or alias (e.g. champion) to deploy")
    group.add_argument("--status", action="store_true", help="print the application status and model")
    parser.add_argument("--model", help="registered model name (default CT_REGISTERED_MODEL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    deployer = ServeDeployer()
    if args.status:
        status, message = deployer.app_status()
        serving = deployer.serving()
        print(
            json.dumps(
                {"status": status, "message": message, "serving": serving.__dict__ if serving else None}
            )
        )
        return 0
    from mlflow import MlflowClient

    from ml.registry import mark_serving, resolve_version

    name = args.model or deployer.settings.registered_model
    client = MlflowClient(tracking_uri=deployer.settings.mlflow_tracking_uri)
    version = resolve_version(client, name, args.version)  # the run id too: a number can be reused
    try:
        result = deployer.deploy(version.version, model_name=name, run_id=version.run_id)
        deployer.verify(result)  # rolls back on a failed smoke test, as the DAG's smoke_test task does
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    mark_serving(deployer.settings, str(version.version), name=name, tags={"deployed_by": "serve.deploy"})
    print(json.dumps({k: v for k, v in result.items() if k != "previous_config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
