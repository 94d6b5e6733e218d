"""The Ray Serve application on the real local stack: HTTP contract, one client's poisoned text
failing no other request, zero-downtime redeploy, a broken model that must not replace a working
one (also under another model's name with the same version number), rollback after a failed smoke
test (in the DAG's way and from ``python -m ml.rollout``), and prediction logging to S3.

Models are real exports of the base model (random seeded heads) registered in the real MLflow
server; traffic is real HTTP to 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import requests

from ml.rollout import DeployError, ServeDeployer
from ml.settings import Settings
from ml.storage import ObjectStore
from tests.conftest import REPO_ROOT
from tests.integration.conftest import restore_serve
from tests.model_factory import build_export, corrupt_export, nan_head, register_export, rotate_head

pytestmark = pytest.mark.integration

SERVE = "http://127.0.0.1:8000"


@dataclass
class Traffic:
    """Closed-loop single-text requests from a few threads until stopped (or a bound is hit)."""

    texts: list[str]
    workers: int = 2
    max_requests: int = 3000
    max_seconds: float = 240.0
    url: str = (
        f"{SERVE}/v1/predict"  # another model's route: f"{ServeDeployer(settings).serve_url}/v1/predict"
    )
    results: list[tuple[float, float, int, str | None]] = field(default_factory=list)  # sent, done, status, v
    pause_s: float = 0.0  # between a worker's requests (0: closed loop)

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
            sent = time.monotonic()
            try:
                resp = session.post(self.url, json={"text": self.texts[i % len(self.texts)]}, timeout=60)
                version = resp.json()["model"]["version"] if resp.status_code == 200 else None
                status = resp.status_code
            except (requests.RequestException, ValueError, KeyError):
                status, version = -1, None
            with self._lock:
                self.results.append((sent, time.monotonic(), status, version))
            i += self.workers
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    @property
    def failed(self) -> list[tuple[float, float, int, str | None]]:
        return [r for r in self.results if r[2] != 200]

    def versions_sent_after(self, moment: float) -> set[str | None]:
        return {r[3] for r in self.results if r[0] > moment}


@pytest.fixture(scope="module")
def models(local_stack, tmp_path_factory):
    """Three registered versions: ``good``, ``rotated`` (another valid model), ``broken`` (weights cut).

    Plus ``other``: a second registered model whose v1 (the same number as ``good``) is broken, and
    ``nan``: a third whose v1 loads but answers NaN (every prediction fails).
    """
    local_stack.require("s3", "mlflow", "ray")
    settings = Settings(registered_model=f"it-serve-{uuid.uuid4().hex[:8]}")
    tmp = tmp_path_factory.mktemp("serve-models")
    good = build_export(tmp / "good")
    exports = {
        "good": good,
        "rotated": rotate_head(good, tmp / "rotated"),
        "broken": corrupt_export(good, tmp / "broken"),
    }
    versions = {key: register_export(settings, path) for key, path in exports.items()}
    other = settings.model_copy(update={"registered_model": f"{settings.registered_model}-other"})
    nan = settings.model_copy(update={"registered_model": f"{settings.registered_model}-nan"})
    versions["other"] = (other.registered_model, register_export(other, exports["broken"]))
    versions["nan"] = (nan.registered_model, register_export(nan, nan_head(good, tmp / "nan")))
    return settings, versions, exports


@pytest.fixture(scope="module")
def deployer(models):
    settings, _, _ = models
    deployer = ServeDeployer(settings, timeout_s=300, poll_s=1)
    before = deployer.current_config()
    yield deployer
    # leave Serve as the tests found it
    restore_serve(deployer, before)


def _serve(deployer: ServeDeployer, version: str) -> None:
    if (now := deployer.serving()) is None or not now.model.matches(deployer.target(version)):
        deployer.deploy(version)


def _offline(export, texts):
    from ml.predict import TextClassifier

    return TextClassifier.from_dir(export).predict(texts)


def test_http_contract(models, deployer, agnews):
    settings, versions, exports = models
    _serve(deployer, versions["good"])
    texts = agnews["text"].head(6).tolist()

    assert requests.get(f"{SERVE}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{SERVE}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["model"]["version"] == versions["good"]
    info = requests.get(f"{SERVE}/v1/model", timeout=10).json()
    assert info["name"] == settings.registered_model and info["version"] == versions["good"]
    assert info["labels"] == ["Business", "Sports", "World"] and info["last_load_error"] is None
    assert info["run_id"] and info["source"] == f"models:/{settings.registered_model}/{versions['good']}"
    assert "/v1/predict" in requests.get(f"{SERVE}/openapi.json", timeout=10).json()["paths"]

    # batched answers equal the offline predictions of the same export
    body = requests.post(
        f"{SERVE}/v1/predict", json={"texts": texts, "return_all_scores": True}, timeout=30
    ).json()
    assert body["model"] == {
        "name": settings.registered_model,
        "version": versions["good"],
        "run_id": info["run_id"],
    }
    for p, (label, score) in zip(body["predictions"], _offline(exports["good"], texts), strict=True):
        assert p["label"] == label and p["score"] == pytest.approx(score, abs=1e-4)
        assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    single = requests.post(f"{SERVE}/v1/predict", json={"text": texts[0]}, timeout=30).json()
    assert single["predictions"][0]["label"] == body["predictions"][0]["label"]
    assert "scores" not in single["predictions"][0]

    def post(payload=None, data=None):
        resp = requests.post(
            f"{SERVE}/v1/predict",
            json=payload,
            data=data,
            timeout=30,
            headers={"content-type": "application/json"},
        )
        return resp.status_code, resp.json()["detail"]

    status, detail = post(data="{not json")
    assert status == 400 and "malformed JSON" in detail
    assert post({"texts": []}) == (422, "'texts' is empty: send at least one text")
    assert post({"texts": ["ok", 3]}) == (422, "texts[1] must be a string, got number")
    assert post({"texts": ["ok", "  "]}) == (422, "texts[1] is empty or whitespace only")
    status, detail = post({"texts": ["x"] * 65})
    assert status == 413 and "limit is 64" in detail
    status, detail = post({"texts": ["a" * 10_001]})
    assert status == 422 and "10001 characters" in detail
    status, detail = post({"text": "a", "texts": ["b"]})
    assert status == 422 and "exactly one" in detail
    status, detail = post(data='{"texts": ["ok", "bad \\ud800"]}')
    assert status == 422 and "texts[1] is not valid Unicode text" in detail

    # bounded rejections: a 1.2 MB body of wrong types gets a short answer, not megabytes
    resp = requests.post(f"{SERVE}/v1/predict", json={"texts": [1] * 64, "x" * 1_200_000: 0}, timeout=30)
    assert resp.status_code == 422 and len(resp.content) < 4096
    assert len(resp.json()["problems"]) == 10 and resp.json()["more_problems"] == 55
    resp = requests.post(f"{SERVE}/v1/predict", json={"texts": list(range(200_000))}, timeout=30)
    assert resp.status_code == 413 and len(resp.content) < 1024
    resp = requests.post(
        f"{SERVE}/v1/predict", data="x=1", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert resp.status_code == 415 and "application/json" in resp.json()["detail"]
    resp = requests.post(f"{SERVE}/v1/predict", json={"text": "a"}, headers={"X-Request-ID": "x" * 500})
    assert resp.status_code == 400 and "X-Request-ID" in resp.json()["detail"]

    # the OpenAPI document states the limits this deployment enforces
    schema = requests.get(f"{SERVE}/openapi.json", timeout=10).json()
    body_schema = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert body_schema["properties"]["texts"]["maxItems"] == 64
    assert body_schema["properties"]["text"]["maxLength"] == 10_000
    assert body_schema["oneOf"] == [{"required": ["texts"]}, {"required": ["text"]}]


def test_a_poisoned_request_fails_no_other_request(models, deployer, agnews):
    """Texts of concurrent requests share forward passes: one request with text the tokenizer
    cannot read (a lone surrogate, valid JSON) once failed 24 of 36 concurrent requests."""
    from concurrent.futures import ThreadPoolExecutor

    _, versions, _ = models
    _serve(deployer, versions["good"])
    texts = agnews["text"].head(37).tolist()
    poisoned = '{"texts": ["Markets rallied today.", "\\ud800 poisoned"]}'

    def send(i: int) -> tuple[int, str]:
        if i == 18:
            resp = requests.post(
                f"{SERVE}/v1/predict", data=poisoned, headers={"content-type": "application/json"}, timeout=60
            )
        else:
            resp = requests.post(f"{SERVE}/v1/predict", json={"text": texts[i]}, timeout=60)
        return resp.status_code, resp.text

    for _ in range(3):  # three bursts: the poisoned request lands in a shared batch at least once
        with ThreadPoolExecutor(max_workers=37) as pool:
            answers = list(pool.map(send, range(37)))
        status, text = answers[18]
        assert status == 422 and "texts[1] is not valid Unicode text" in text, (status, text)
        others = [a for i, a in enumerate(answers) if i != 18]
        assert [s for s, _ in others] == [200] * 36, [a for a in others if a[0] != 200][:3]


def test_redeploy_under_load_fails_no_request(models, deployer, agnews):
    _, versions, _ = models
    _serve(deployer, versions["good"])
    with Traffic(agnews["text"].head(200).tolist()) as traffic:
        time.sleep(3)
        result = deployer.deploy(versions["rotated"])
        switched = time.monotonic()
        time.sleep(3)
    assert result["previous_version"] == versions["good"]
    assert len(traffic.results) > 20, "too little traffic to show anything"
    assert traffic.failed == [], traffic.failed[:5]
    seen = [r[3] for r in sorted(traffic.results)]
    assert seen[0] == versions["good"] and seen[-1] == versions["rotated"]
    # once the deploy returned, every request got the new version
    assert traffic.versions_sent_after(switched) == {versions["rotated"]}
    assert deployer.serving().version == versions["rotated"]


def test_broken_model_leaves_the_old_one_serving(models, deployer, agnews):
    _, versions, _ = models
    _serve(deployer, versions["rotated"])
    with Traffic(agnews["text"].head(200).tolist()) as traffic:
        time.sleep(2)
        with pytest.raises(DeployError) as failure:
            deployer.deploy(versions["broken"])
        time.sleep(2)
    message = str(failure.value)
    assert len(traffic.results) > 20, "too little traffic to show anything"
    assert f"v{versions['broken']}" in message and "could not load" in message
    assert f"Rolled back: {deployer.settings.registered_model} v{versions['rotated']} (run" in message
    assert traffic.failed == [], traffic.failed[:5]
    assert {r[3] for r in traffic.results} == {versions["rotated"]}
    serving = deployer.serving()
    assert serving.version == versions["rotated"] and serving.last_load_error is None
    # the running config names the old version again
    app = deployer.app_config(deployer.current_config())
    assert app["deployments"][0]["user_config"]["model_version"] == versions["rotated"]


def test_failed_smoke_test_rolls_back(models, deployer, agnews):
    """What the DAG's smoke_test does: the new version answers, but not like it did offline."""
    _, versions, exports = models
    _serve(deployer, versions["rotated"])
    texts = agnews["text"].head(4).tolist()
    deployed = deployer.deploy(versions["good"])
    # offline predictions of another model: the served ones cannot match them
    wrong = _offline(exports["rotated"], texts)
    expected = {"texts": texts, "labels": [x for x, _ in wrong], "scores": [s for _, s in wrong]}
    with pytest.raises(DeployError) as failure:
        deployer.verify(deployed, expected)
    message = str(failure.value)
    assert deployed["run_id"]  # the deployer looked the version's training run up
    assert f"v{versions['good']} (run {deployed['run_id'][:8]}) failed: text 0: served" in message
    assert f"Rolled back: {deployer.settings.registered_model} v{versions['rotated']}" in message
    assert deployer.serving().version == versions["rotated"]
    # and the right expectations pass
    right = _offline(exports["rotated"], texts)
    deployer.smoke_test(
        deployer.target(versions["rotated"]),
        {"texts": texts, "labels": [x for x, _ in right], "scores": [s for _, s in right]},
    )


def test_same_version_number_of_another_model_is_not_the_served_model(models, deployer):
    """Deploying B v1 (broken) while A v1 serves once reported success: answers were matched on the
    version number alone, and the config was left pointing at the broken model."""
    settings, versions, _ = models
    other_name, other_version = versions["other"]
    assert other_version == versions["good"]  # the point: the same number
    _serve(deployer, versions["good"])
    with pytest.raises(DeployError) as failure:
        deployer.deploy(other_version, model_name=other_name)
    message = str(failure.value)
    assert f"could not load {other_name} v{other_version}" in message, message
    assert f"Rolled back: {settings.registered_model} v{versions['good']}" in message
    serving = deployer.serving()
    assert (serving.model.name, serving.version) == (settings.registered_model, versions["good"])
    user_config = deployer.app_config(deployer.current_config())["deployments"][0]["user_config"]
    assert (user_config["model_name"], user_config["model_version"]) == (
        settings.registered_model,
        versions["good"],
    )


def test_cli_rolls_back_a_model_that_fails_its_smoke_test(models, deployer, capsys):
    """``python -m ml.rollout`` ends a deploy like the DAG does: smoke test, rollback on failure."""
    from ml.rollout import main

    settings, versions, _ = models
    nan_name, nan_version = versions["nan"]
    _serve(deployer, versions["good"])
    assert main(["--version", nan_version, "--model", nan_name]) == 1
    err = capsys.readouterr().err
    assert f"smoke test of {nan_name} v{nan_version}" in err and "Rolled back" in err, err
    serving = deployer.serving()
    assert (serving.model.name, serving.version) == (settings.registered_model, versions["good"])
    user_config = deployer.app_config(deployer.current_config())["deployments"][0]["user_config"]
    assert user_config["model_name"] == settings.registered_model


def test_served_predictions_are_logged_to_s3(models, deployer):
    from ml.prediction_log import read_predictions

    settings, versions, _ = models
    _serve(deployer, versions["rotated"])
    marker = f"logged text {uuid.uuid4().hex}"
    start = datetime.now(UTC) - timedelta(minutes=1)
    resp = requests.post(f"{SERVE}/v1/predict", json={"texts": [marker, marker + " again"]}, timeout=30)
    assert resp.status_code == 200
    store = ObjectStore(settings)
    deadline = time.monotonic() + 30  # flushed every 5 s
    while time.monotonic() < deadline:
        frame = read_predictions(store, start, datetime.now(UTC) + timedelta(minutes=1))
        rows = frame[frame["text"].str.startswith(marker)] if len(frame) else frame
        if len(rows) == 2:
            break
        time.sleep(1)
    assert len(rows) == 2, f"prediction log has {len(rows)} of 2 rows"
    assert set(rows["model_version"]) == {versions["rotated"]}
    assert set(rows["model_name"]) == {settings.registered_model}
    assert set(rows["model_run_id"]) == {resp.json()["model"]["run_id"]}
    assert set(rows["request_id"]) == {resp.json()["request_id"]}
    assert rows["label"].isin(["Business", "Sports", "World"]).all()
    keys = [o.key for o in store.list(f"predictions/dt={start:%Y-%m-%d}/")]
    assert keys and all("/hour=" in k and k.endswith(".parquet") for k in keys)


def test_custom_metrics_are_exported(models, deployer):
    """The app's metrics reach Ray's Prometheus endpoint (what a scraper reads)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from stack import RAY_METRICS_PORT

    settings, versions, _ = models
    _serve(deployer, versions["rotated"])
    requests.post(
        f"{SERVE}/v1/predict", json={"texts": ["one", "two", "three"]}, timeout=30
    ).raise_for_status()
    wanted = {
        "ray_ct_serve_batch_size_count",
        "ray_ct_serve_request_latency_ms_count",
        "ray_ct_serve_texts_total",
        "ray_ct_serve_prediction_log_written_total",
    }
    info = f'model_name="{settings.registered_model}",model_version="{versions["rotated"]}"'
    deadline = time.monotonic() + 60  # metrics are pushed to the exporter every few seconds
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", timeout=10).text
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
        model_info = [
            line for line in text.splitlines() if line.startswith("ray_ct_serve_model_info{") and info in line
        ]
        if wanted <= names and model_info and model_info[0].endswith(" 1.0"):
            break
        time.sleep(2)
    assert wanted <= names, wanted - names
    assert model_info and model_info[0].endswith(" 1.0"), model_info
