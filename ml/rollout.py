"""Deploy a registered model version to the Ray Serve application, check it, roll back if it fails.

Used by the ``deploy`` and ``smoke_test`` tasks of ``continuous_training`` and by hand::

    python -m ml.rollout --version 3          # or --version champion
    python -m ml.rollout --status

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
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import requests
import yaml

from ml.serve_options import ServeOptions
from ml.settings import Settings, is_secret_name, load_settings, settings_env

log = logging.getLogger(__name__)

# The template of a new application (the first deploy of a dataset), kept with the Serve app.
CONFIG_FILE = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"
# The application of the deployment's default dataset (CT_SERVE_DEFAULT_DATASET), at route "/";
# every other dataset's application is named after the dataset, at "/<dataset>" (:func:`serve_app`).
APP_NAME = "classifier"
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# Dataset names that cannot be an application's route prefix: "/v1" would take "/v1/predict" away
# from the default application, and "classifier" is the default application's own name.
RESERVED_DATASET_NAMES = frozenset({APP_NAME, "v1", "healthz", "readyz", "docs", "redoc", "openapi.json"})
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
class ServeApp:
    """Where one dataset's model is served: its own Serve application, replicas and user_config.

    The default dataset keeps the application ``classifier`` at route ``/`` (what running
    deployments and the KubeRay manifests have; the app also answers under ``/<dataset>``); any
    other dataset's application is named after it, at ``/<dataset>``.
    """

    name: str
    route_prefix: str
    dataset: str

    @property
    def path(self) -> str:
        """What goes between ``CT_SERVE_URL`` and ``/v1/...``: empty for route ``/``."""
        return self.route_prefix.rstrip("/")


def check_dataset_name(dataset: str) -> str:
    """``dataset``, if it can name a Serve application and a route prefix; else :class:`DeployError`."""
    if not DATASET_NAME.fullmatch(dataset or ""):
        raise DeployError(
            f"dataset name {dataset!r} cannot name a Serve application and route prefix /<dataset>: "
            "use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    if dataset.lower() in RESERVED_DATASET_NAMES:
        raise DeployError(
            f"dataset name {dataset!r} is reserved: the route /{dataset} would take the default "
            f"application's own paths (or name), so it cannot be a dataset's application; rename the dataset"
        )
    return dataset


def serve_app(dataset: str, default_dataset: str) -> ServeApp:
    """The Serve application of ``dataset``'s model, given the deployment's default dataset."""
    check_dataset_name(dataset)
    if dataset == default_dataset:
        return ServeApp(APP_NAME, "/", dataset)
    return ServeApp(dataset, f"/{dataset}", dataset)


def replace_app_entry(
    config: dict[str, Any] | None, name: str, entry: dict[str, Any] | None
) -> dict[str, Any]:
    """``config`` with application ``name``'s entry replaced by ``entry`` (appended if absent, removed
    if ``entry`` is None). Every other entry and key is carried over as it is (a declarative PUT
    replaces the whole config: an entry that changed would redeploy that application)."""
    config = copy.deepcopy(config) if config else {}
    apps = list(config.get("applications") or [])
    position = next((i for i, app in enumerate(apps) if app.get("name") == name), None)
    if position is None and entry is not None:
        apps.append(copy.deepcopy(entry))
    elif position is not None and entry is None:
        del apps[position]
    elif position is not None:
        apps[position] = copy.deepcopy(entry)
    config["applications"] = apps
    return config


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
    candidate: dict[str, Any] | None = None  # a candidate in shadow or canary (GET /v1/model)

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
            data.get("candidate"),
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
        app_name: str | None = None,
        route_prefix: str | None = None,
        config_file: Path = CONFIG_FILE,
        timeout_s: float = 600.0,
        poll_s: float = 2.0,
        control: ServeRestApi | RayServiceApi | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        if app_name is None:  # the run's dataset picks the application (serve_app)
            self.app = serve_app(self.settings.dataset, self.settings.serve_default_dataset)
        else:  # an application of its own (benchmarks)
            self.app = ServeApp(app_name, route_prefix or "/", self.settings.dataset)
        if route_prefix is not None:
            self.app = replace(self.app, route_prefix=route_prefix)
        self.app_name = self.app.name
        self.route_prefix = self.app.route_prefix
        self.config_file = config_file
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        # every HTTP check (serving, predict, smoke test, rollback) goes to this application's route
        self.serve_url = self.settings.serve_url.rstrip("/") + self.app.path
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

        from ml.prediction_log import PIPELINE_REQUEST_PREFIX

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
        """``base`` (the running config) with our app pointed at ``version``; a new app (not in
        ``base``) starts from ``serve/config.yaml``. Only our app's entry changes: the others go back
        exactly as ``base`` has them, so a PUT of the result leaves their replicas alone."""
        config = copy.deepcopy(base) if base and self.app_config(base) else self._file_config(base)
        app = self.app_config(config)
        deployment = app["deployments"][0]
        user_config = {
            **(deployment.get("user_config") or {}),
            "model_name": model_name or self.settings.registered_model,
            "model_version": str(version),
            "model_path": "",
        }
        user_config.pop("candidate", None)  # a deploy ends any staged rollout (ml.staged_rollout)
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

    def candidate_config(self, base: dict[str, Any] | None, candidate: dict[str, Any] | None) -> dict:
        """``base`` with our application's ``user_config.candidate`` set to ``candidate`` (None:
        removed), everything else as it runs: the serving model and the other applications stay.
        A candidate needs a running application of ours (the champion it runs beside)."""
        config = copy.deepcopy(base) if base else None
        app = self.app_config(config)
        if app is None:
            raise DeployError(f"application {self.app_name!r} does not run: no serving model to run beside")
        deployment = app["deployments"][0]
        user_config = dict(deployment.get("user_config") or {})
        if candidate is None:
            user_config.pop("candidate", None)
        else:
            user_config["candidate"] = dict(candidate)
        ServeOptions.model_validate(user_config)  # refuse a bad candidate here, not in the replica
        deployment["user_config"] = user_config
        return config

    def _poll(self, checks: int, judge: Any) -> tuple[Serving | None, str]:
        """Until the app is RUNNING and ``judge(answers)`` of ``checks`` answers in a row returns
        a :class:`Serving` (done); ``judge`` returns a string describing what it saw otherwise, and
        raises :class:`DeployError` to stop at once. (None, last seen) after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            status, message = self.app_status()
            if status in {"DEPLOY_FAILED", "UNHEALTHY"}:
                raise DeployError(f"application {self.app_name!r} is {status}: {message.strip()[:2000]}")
            if status == "RUNNING":
                verdict = judge([self.serving() for _ in range(checks)])
                if isinstance(verdict, Serving):
                    return verdict, ""
                last = verdict
            else:
                last = f"application {status}"
            time.sleep(self.poll_s)
        return None, last

    def wait_for_candidate(self, target: ModelId | None, mode: str | None = None, checks: int = 6) -> Serving:
        """Until ``checks`` answers in a row report ``target`` loaded as candidate in ``mode`` (or,
        ``target`` None, no candidate). Fails at once on a replica's candidate load error."""

        def judge(answers: list[Serving | None]) -> Serving | str:
            if target is None and all(a is not None and a.candidate is None for a in answers):
                return answers[0]
            for a in answers:
                cand = a.candidate if a else None
                if target is not None and cand and cand.get("load_error"):
                    raise DeployError(f"the replicas could not load candidate {target}: {cand['load_error']}")
            if target is not None and all(
                a is not None
                and a.candidate
                and ModelId(
                    a.candidate["name"], str(a.candidate.get("version")), a.candidate.get("run_id")
                ).matches(target)
                and (mode is None or a.candidate.get("mode") == mode)
                for a in answers
            ):
                return answers[0]
            return str(answers[0].candidate if answers[0] else "no answer")[:300]

        found, last = self._poll(checks, judge)
        if found is None:
            wanted = f"candidate {target} ({mode})" if target else "no candidate"
            raise DeployError(f"{wanted} was not in place after {self.timeout_s:.0f} s (last seen: {last})")
        return found

    def _file_config(self, running: dict[str, Any] | None) -> dict[str, Any]:
        """The running config plus our new application, made from ``serve/config.yaml``'s
        application (renamed and moved to our route prefix when it is not the default one)."""
        config = yaml.safe_load(self.config_file.read_text())
        template = [app for app in config["applications"] if app["name"] in {self.app_name, APP_NAME}]
        if not template:
            raise DeployError(f"{self.config_file} has no application named {APP_NAME!r} to start from")
        ours = {**template[0], "name": self.app_name, "route_prefix": self.route_prefix}
        if running:  # other applications keep running as they are
            taken = [a["name"] for a in running["applications"] if a.get("route_prefix") == self.route_prefix]
            if taken:
                raise DeployError(
                    f"route prefix {self.route_prefix} of application {self.app_name!r} (dataset "
                    f"{self.app.dataset!r}) is taken by application {taken[0]!r}; nothing was changed"
                )
            config = {k: copy.deepcopy(v) for k, v in running.items() if k != "applications"}
            config["applications"] = [*copy.deepcopy(running["applications"]), ours]
        else:
            config["applications"] = [ours]
            if host := self.settings.serve_http_host:  # in a container: listen beyond loopback
                config["http_options"] = {**(config.get("http_options") or {}), "host": host}
        # a new application: the replica settings apply to it (and only to it)
        if (gpus := self.settings.serve_num_gpus) is not None:
            for deployment in ours.get("deployments", []):
                options = deployment.get("ray_actor_options") or {}
                deployment["ray_actor_options"] = {**options, "num_gpus": gpus}
        minimum, per_node = self.settings.serve_min_replicas, self.settings.serve_max_replicas_per_node
        for deployment in ours.get("deployments", []):  # production: >= 2 replicas, one per node
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
            "app": self.app_name,
            "route_prefix": self.route_prefix,
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

        def judge(answers: list[Serving | None]) -> Serving | str:
            if all(a is not None and a.model.matches(target) for a in answers):
                return answers[0]
            failed = [a for a in answers if a is not None and a.failed_to_load(target)]
            if failed:
                raise DeployError(
                    f"the replicas could not load {target} and kept {failed[0].model}: "
                    f"{failed[0].last_load_error}"
                )
            return ", ".join(str(a.model) if a else "no answer" for a in answers)

        found, last = self._poll(replicas_checks, judge)
        if found is None:
            raise DeployError(f"{target} was not serving after {self.timeout_s:.0f} s (last seen: {last})")
        return found

    def rollback(
        self, previous_config: dict[str, Any] | None, previous: ModelId | dict | None, reason: str
    ) -> NoReturn:
        """Put our application's entry of ``previous_config`` back, check the old model answers, and
        raise :class:`DeployError`.

        Only our entry is restored, inside the config running *now*: other applications (other
        datasets' models, changed meanwhile by their own deploys) are put back as they are now, so
        they are neither restarted nor reverted.
        """
        if isinstance(previous, dict):
            previous = ModelId.from_dict(previous)
        log.error("%s; rolling back", reason)
        try:
            previous_app = self.app_config(previous_config)
            current = self.current_config()
            if current is None:  # Serve lost everything meanwhile: keep the old global options
                current = {k: v for k, v in (previous_config or {}).items() if k != "applications"}
            self.apply(replace_app_entry(current, self.app_name, previous_app))
            if previous_app is None:
                # nothing served before: the broken application was taken down rather than left half up
                raise DeployError(f"{reason}. Nothing was serving before; the application was removed.")
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

        The ``smoke_test`` task of the DAG and ``python -m ml.rollout`` both end a deploy with it.
        """
        target = ModelId.from_dict(deployed)
        if deployed.get("app", self.app_name) != self.app_name:
            raise DeployError(
                f"{target} was deployed to application {deployed['app']!r}, not {self.app_name!r} "
                f"(dataset {self.app.dataset!r}): verify it with the settings of its own dataset"
            )
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


def deploy_promoted(settings: Settings, outcome: dict[str, Any], actor: str = "") -> dict[str, Any]:
    """The ``deploy`` task: serve the version :func:`ml.registry.register_challenger` promoted, in
    the Serve application of ``settings.dataset`` (:func:`serve_app`; other datasets' untouched).

    Returns what :func:`verify_deployed` needs; raises :class:`DeployError` (after rolling back)
    when the new version does not serve. A failed attempt goes into the serving history.
    """
    deployer = ServeDeployer(settings)
    started = time.monotonic()
    before = deployer.serving()
    try:
        return deployer.deploy(outcome["version"], model_name=outcome["name"], run_id=outcome.get("run_id"))
    except DeployError as err:
        _record_failed(
            settings,
            outcome["name"],
            before.version if before else None,
            str(outcome["version"]),
            actor,
            started,
            err,
        )
        raise


def verify_deployed(
    settings: Settings,
    deployed: dict[str, Any],
    expected: dict[str, Any] | None,
    actor: str,
    *,
    reason: str = "promoted to champion by the offline gate",
    move_champion: bool = False,
) -> dict[str, Any]:
    """The ``smoke_test`` task: the served answers must equal the offline ones (``expected``, the
    evaluation's smoke set), else roll back (:class:`DeployError`). On success the version gets the
    ``serving`` alias, tagged with ``actor`` (the DAG run or user that deployed it), and the deploy
    goes into the serving history (as does a failed one, with its automatic rollback).
    ``move_champion``: also move ``champion`` to it (a staged rollout's promotion: until now the
    version was only ``challenger``)."""
    from ml.registry import mark_serving
    from ml.serving_history import record

    started = time.monotonic() - float(deployed.get("seconds") or 0)
    try:
        deployer = ServeDeployer(settings)  # the application of settings.dataset, as deploy_promoted's
        report = deployer.verify(deployed, expected)
    except DeployError as err:
        _record_failed(
            settings,
            deployed["name"],
            deployed.get("previous_version"),
            str(deployed["version"]),
            actor,
            started,
            err,
        )
        raise
    if move_champion:
        from mlflow import MlflowClient

        from ml.registry import CHAMPION

        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        client.set_registered_model_alias(deployed["name"], CHAMPION, str(deployed["version"]))
        client.set_model_version_tag(deployed["name"], str(deployed["version"]), "rollout", reason)
        log.info("%s v%s is champion: %s", deployed["name"], deployed["version"], reason)
    mark_serving(settings, deployed["version"], name=deployed["name"], tags={"deployed_by": actor})
    record(
        settings,
        model=deployed["name"],
        dataset=settings.dataset,
        action="deploy",
        from_version=deployed.get("previous_version"),
        to_version=str(deployed["version"]),
        result="ok",
        actor=actor,
        reason=reason,
        seconds=round(time.monotonic() - started, 1),
    )
    return {**report, "name": deployed["name"], "serve_url": deployer.serve_url}


def _record_failed(
    settings: Settings,
    name: str,
    previous: str | None,
    attempted: str,
    actor: str,
    started: float,
    err: Exception,
) -> None:
    """A deploy that failed: the automatic rollback put ``previous`` back (or could not)."""
    from ml.serving_history import record

    try:
        record(
            settings,
            model=name,
            dataset=settings.dataset,
            action="auto_rollback",
            from_version=attempted,
            to_version=previous,
            result="failed" if "ROLLBACK ALSO FAILED" in str(err) else "ok",
            actor=actor,
            reason=f"deploy of v{attempted} failed",
            seconds=round(time.monotonic() - started, 1),
            detail=str(err)[:2000],
        )
    except Exception:  # the deploy's own error is what the task must report
        log.exception("could not record the failed deploy of %s v%s in the serving history", name, attempted)


def main(argv: Sequence[str] | None = None) -> int:
    import getpass

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--version", help="version number or alias (e.g. champion) to deploy")
    group.add_argument("--status", action="store_true", help="print the application status and model")
    parser.add_argument("--dataset", help="the dataset whose application to act on (default CT_DATASET)")
    parser.add_argument("--model", help="registered model name (default <dataset>-classifier)")
    parser.add_argument(
        "--reason", default="deployed by hand (python -m ml.rollout)", help="for the serving history"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = load_settings(**({"dataset": args.dataset} if args.dataset else {}))
    deployer = ServeDeployer(settings)
    if args.status:
        status, message = deployer.app_status()
        serving = deployer.serving()
        print(
            json.dumps(
                {
                    "application": deployer.app_name,
                    "route_prefix": deployer.route_prefix,
                    "status": status,
                    "message": message,
                    "serving": serving.__dict__ if serving else None,
                },
                default=str,
            )
        )
        return 0
    from mlflow import MlflowClient

    from ml.registry import mark_serving, resolve_version
    from ml.serving_history import record

    name = args.model or settings.registered_model
    actor = f"user:{getpass.getuser()} (ml.rollout)"
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    version = resolve_version(client, name, args.version)  # the run id too: a number can be reused
    started = time.monotonic()
    before = deployer.serving()
    previous = before.version if before else None
    try:
        result = deployer.deploy(version.version, model_name=name, run_id=version.run_id)
        deployer.verify(result)  # rolls back on a failed smoke test, as the DAG's smoke_test task does
    except DeployError as err:
        _record_failed(settings, name, previous, str(version.version), actor, started, err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    mark_serving(settings, str(version.version), name=name, tags={"deployed_by": actor})
    record(
        settings,
        model=name,
        dataset=settings.dataset,
        action="pin",
        from_version=previous,
        to_version=str(version.version),
        result="ok",
        actor=actor,
        reason=args.reason,
        seconds=round(time.monotonic() - started, 1),
    )
    print(json.dumps({k: v for k, v in result.items() if k != "previous_config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
