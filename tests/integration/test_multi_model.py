"""Two datasets' models side by side, each in its own Ray Serve application, on the real stack.

Model A (AG News' 4 labels) is the deployment's default dataset: application ``classifier`` at
``/`` (and ``/<dataset A>``). Model B (20 Newsgroups-like labels) gets the application named after
its dataset, at ``/<dataset B>``. Under continuous client traffic to A, B is deployed, broken twice
(a weights file that does not load; a model that answers NaN and fails its smoke test) and rolled
back each time. A must answer every request, with the same version, on the same replicas, from a
config entry that never changed. Traffic is bounded and goes to 127.0.0.1 only.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
import requests

from ml.rollout import APP_NAME, DeployError, ServeDeployer, replace_app_entry
from ml.settings import Settings
from tests.model_factory import build_export, corrupt_export, nan_head, register_export

pytestmark = pytest.mark.integration

SERVE = "http://127.0.0.1:8000"
AGNEWS_LABELS = ["Business", "Sci/Tech", "Sports", "World"]
NEWSGROUPS_LABELS = [
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
    "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
    "talk.religion.misc",
]  # fmt: skip


@dataclass
class Traffic:
    """Closed-loop single-text requests to one URL from a few threads, until stopped or a bound."""

    url: str
    texts: list[str]
    workers: int = 2
    max_requests: int = 4000
    max_seconds: float = 200.0
    results: list[tuple[int, str | None, str | None]] = field(default_factory=list)  # status, name, version

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)
        ]

    def _run(self, worker: int) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.max_seconds
        i = worker
        while (
            not self._stop.is_set() and time.monotonic() < deadline and len(self.results) < self.max_requests
        ):
            try:
                resp = session.post(self.url, json={"text": self.texts[i % len(self.texts)]}, timeout=60)
                model = resp.json()["model"] if resp.status_code == 200 else {}
                result = (resp.status_code, model.get("name"), model.get("version"))
            except (requests.RequestException, ValueError, KeyError) as err:
                result = (-1, type(err).__name__, None)
            with self._lock:
                self.results.append(result)
            i += self.workers

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


@pytest.fixture(scope="module")
def two_models(local_stack, tmp_path_factory):
    """A (default dataset, 4 labels) v1; B (20 labels) v1 good, v2 cut weights, v3 answers NaN."""
    local_stack.require("s3", "mlflow", "ray")
    tag = uuid.uuid4().hex[:8]
    a = Settings(dataset=f"it-mma-{tag}", serve_default_dataset=f"it-mma-{tag}")
    b = Settings(dataset=f"it-mmb-{tag}", serve_default_dataset=a.dataset)
    tmp = tmp_path_factory.mktemp("multi-model")
    a_export = build_export(tmp / "a", AGNEWS_LABELS)
    b_export = build_export(tmp / "b", NEWSGROUPS_LABELS, seed=1)
    versions = {
        "a": register_export(a, a_export),
        "b": register_export(b, b_export),
        "b_broken": register_export(b, corrupt_export(b_export, tmp / "b-broken")),
        "b_nan": register_export(b, nan_head(b_export, tmp / "b-nan")),
    }
    return a, b, versions


@pytest.fixture(scope="module")
def deployers(two_models):
    a, b, _ = two_models
    deployer_a = ServeDeployer(a, timeout_s=240, poll_s=1)
    deployer_b = ServeDeployer(b, timeout_s=240, poll_s=1)
    assert (deployer_a.app_name, deployer_a.route_prefix) == (APP_NAME, "/")
    assert (deployer_b.app_name, deployer_b.route_prefix) == (b.dataset, f"/{b.dataset}")
    before = deployer_a.current_config()
    yield deployer_a, deployer_b
    # leave Serve as the test found it: B's application gone, the default one as it was
    config = deployer_a.current_config()
    for name in (APP_NAME, deployer_b.app_name):
        config = replace_app_entry(config, name, deployer_a.app_config(before) if name == APP_NAME else None)
    deployer_a.apply(config)


def _replicas(deployer: ServeDeployer, app: str) -> set[tuple[str, str, float]]:
    replicas = deployer.details()["applications"][app]["deployments"]["Classifier"]["replicas"]
    return {(r["replica_id"], r["actor_name"], r["start_time_s"]) for r in replicas}


def _app_state(deployer: ServeDeployer, app: str) -> tuple:
    """Status, deployed config and deployment config (not ``last_deployed_time_s``: Serve stamps every
    application of a declarative PUT with it, also those whose config did not change)."""
    details = deployer.details()["applications"][app]
    deployment = details["deployments"]["Classifier"]
    return (
        details["status"],
        details["deployed_app_config"],
        deployment["status"],
        deployment["deployment_config"],
    )


def test_two_models_side_by_side_and_b_never_disturbs_a(two_models, deployers, agnews):
    a, b, versions = two_models
    deployer_a, deployer_b = deployers
    if (
        (now := deployer_a.serving()) is None
        or now.version != versions["a"]
        or now.model.name != a.registered_model
    ):
        deployer_a.deploy(versions["a"])
    replicas_a, state_a = _replicas(deployer_a, APP_NAME), _app_state(deployer_a, APP_NAME)
    assert state_a[0] == "RUNNING" and replicas_a
    loaded_a = requests.get(f"{SERVE}/v1/model", timeout=30).json()["loaded_at"]

    texts = agnews["text"].head(100).tolist()
    with Traffic(f"{SERVE}/v1/predict", texts) as traffic:
        time.sleep(2)
        # B's first deploy creates its application from serve/config.yaml at /<dataset B>
        deployed = deployer_b.deploy(versions["b"])
        assert deployed["app"] == b.dataset and deployed["previous"] is None
        deployer_b.verify(deployed)
        # a model that does not load: B's replicas keep v1, the deploy rolls B's entry back
        with pytest.raises(DeployError) as broken:
            deployer_b.deploy(versions["b_broken"])
        assert "could not load" in str(broken.value) and "Rolled back" in str(broken.value), broken.value
        # a model that loads and answers NaN: its smoke test fails, B is rolled back to v1
        deployed = deployer_b.deploy(versions["b_nan"])
        with pytest.raises(DeployError) as nan:
            deployer_b.verify(deployed)
        assert f"Rolled back: {b.registered_model} v{versions['b']}" in str(nan.value), nan.value
        time.sleep(2)

    # A: every request answered, by A's model and version, on the same replicas, config untouched
    assert len(traffic.results) > 50, f"too little traffic to show anything: {len(traffic.results)}"
    failed = [r for r in traffic.results if r[0] != 200]
    assert failed == [], failed[:5]
    assert {(name, version) for _, name, version in traffic.results} == {(a.registered_model, versions["a"])}
    assert _replicas(deployer_a, APP_NAME) == replicas_a
    assert _app_state(deployer_a, APP_NAME) == state_a
    assert requests.get(f"{SERVE}/v1/model", timeout=30).json()["loaded_at"] == loaded_a  # no reload

    # B serves v1 at its own route, with its own labels
    serving_b = deployer_b.serving()
    assert (serving_b.model.name, serving_b.version) == (b.registered_model, versions["b"])
    assert serving_b.labels == sorted(NEWSGROUPS_LABELS)
    answer = requests.post(
        f"{SERVE}/{b.dataset}/v1/predict", json={"text": "the goalie saved it"}, timeout=30
    )
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in NEWSGROUPS_LABELS

    # the default application answers under / and under /<dataset A>
    for prefix in ("", f"/{a.dataset}"):
        resp = requests.post(f"{SERVE}{prefix}/v1/predict", json={"text": texts[0]}, timeout=30)
        assert resp.status_code == 200, (prefix, resp.text[:300])
        assert resp.json()["model"]["name"] == a.registered_model
        assert resp.json()["predictions"][0]["label"] in AGNEWS_LABELS
        info = requests.get(f"{SERVE}{prefix}/v1/model", timeout=30).json()
        assert (info["name"], info["version"]) == (a.registered_model, versions["a"])
    # a dataset without an application of its own is not answered by the default one
    missing = requests.post(
        f"{SERVE}/it-none-{uuid.uuid4().hex[:6]}/v1/predict", json={"text": "x"}, timeout=30
    )
    assert missing.status_code == 404

    # GET /v1/models lists both, from Serve's state
    listing = requests.get(f"{SERVE}/v1/models", timeout=30)
    assert listing.status_code == 200, listing.text[:500]
    body = listing.json()
    assert body["default_dataset"] == a.dataset
    models = {m["app"]: m for m in body["models"]}
    assert {APP_NAME, b.dataset} <= set(models), body
    ma, mb = models[APP_NAME], models[b.dataset]
    assert (ma["dataset"], ma["registered_model"], ma["version"]) == (
        a.dataset,
        a.registered_model,
        versions["a"],
    )
    assert ma["routes"] == ["/", f"/{a.dataset}"] and ma["default"] and ma["status"] == "RUNNING"
    assert (mb["dataset"], mb["registered_model"], mb["version"]) == (
        b.dataset,
        b.registered_model,
        versions["b"],
    )
    assert mb["route_prefix"] == f"/{b.dataset}" and not mb["default"] and mb["status"] == "RUNNING"
    assert ma["error"] is None and mb["error"] is None
    assert requests.get(f"{SERVE}/{a.dataset}/v1/models", timeout=30).json()["models"] == body["models"]
