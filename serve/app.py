"""Ray Serve application: the registered text classifier behind a FastAPI ingress, batched.

One deployment (``Classifier``) both parses HTTP and runs the model, so a request costs one hop:

* ``POST /v1/predict`` ``{"texts": [...]}`` (or ``{"text": "..."}``) → a label and score per
  text, and the model name and version that produced them;
* ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded), ``GET /v1/model``
  (name, version, labels, training run); OpenAPI docs at ``/docs``.

Every text of every request goes through one ``@serve.batch`` method, so texts of concurrent
requests share forward passes; inside a batch they are sorted by length and padded only to the
longest of their batch (:class:`ml.predict.TextClassifier`). The model is loaded once per
replica, from the MLflow registry: ``model_version`` (a version or an alias such as
``champion``) is resolved to a concrete version, whose safetensors export is downloaded and
cached on the node.

A ``user_config`` change (``serve/config.yaml``, or the DAG's deploy task) is applied in place by
:meth:`Classifier.reconfigure`: the new model is loaded beside the old one and swapped in only once
it loaded, so a broken model never replaces a working one; the failure is reported by
``/v1/model`` (``last_load_error``) and the deploy task rolls the config back.

Run it: ``serve deploy serve/config.yaml`` (or ``serve run serve.app:classifier_app``): with no
``user_config``, or none naming ``model_version``, a replica serves the registered model's
``champion`` (``CT_REGISTERED_MODEL``). While no model is promoted to that alias the replica stays
up, answers 503 on ``/v1/predict`` and ``/readyz`` saying so, and retries until one is
(:meth:`Classifier._load`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics

from ml.serve_options import CandidateOptions
from serve.schemas import (
    REQUEST_ID_PATTERN,
    CandidateInfo,
    ErrorBody,
    InputError,
    ModelInfo,
    ModelRef,
    Prediction,
    PredictResponse,
    ServedModel,
    ServedModels,
    ServeOptions,
    check_request_id,
    max_body_bytes,
    parse_predict_body,
    predict_request_schema,
    quote,
)

log = logging.getLogger("ray.serve")

API_TOKEN_ENV = "CT_SERVE_API_TOKEN"  # set it (on the nodes, or in the runtime_env) to require a bearer token
MODEL_CACHE_ENV = "CT_SERVE_MODEL_CACHE"
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DEPLOYMENT_NAME = "Classifier"  # the deployment of every application of this service (one per dataset)
MODELS_TIMEOUT_S = 2.0  # GET /v1/models: how long one other application may take to say what it serves
SHADOW_NICENESS = 19  # a shadow candidate's inference gets the CPU only when requests leave it idle
SHADOW_QUIET_S = 0.05  # a shadow pass starts only once the serving model has run nothing this long
SHADOW_PASS_TEXTS = 1  # texts per shadow pass: a pass that overlaps a request batch ends soon
PIPELINE_REQUEST_PREFIX = "ct-pipeline-"  # ml.prediction_log's: the pipeline's own smoke-test requests


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A classifier and where it came from; requests keep a reference for their whole life."""

    classifier: Any  # ml.predict.TextClassifier
    name: str
    version: str
    source: str
    requested: str
    run_id: str | None = None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def load_model(options: ServeOptions) -> LoadedModel:
    """Resolve and load the model ``options`` name (blocking: run it in a thread)."""
    from ml.predict import TextClassifier
    from ml.settings import load_settings

    if options.model_path:
        path = Path(options.model_path)
        classifier = TextClassifier.from_dir(path, device=options.device, dtype=options.dtype)
        return LoadedModel(
            classifier,
            name=options.model_name or path.name,
            version=options.model_version if options.model_version != "champion" else "local",
            source=str(path),
            requested=options.reference(),
        )

    from mlflow import MlflowClient

    from ml.registry import resolve_version

    settings = load_settings()
    name = options.model_name or settings.registered_model
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    version = resolve_version(client, name, options.model_version)
    export = fetch_export(client, name, str(version.version), version.run_id or "")
    classifier = TextClassifier.from_dir(export, device=options.device, dtype=options.dtype)
    return LoadedModel(
        classifier,
        name=name,
        version=str(version.version),
        source=f"models:/{name}/{version.version}",
        requested=options.reference(),
        run_id=version.run_id,
    )


def fetch_export(client: Any, name: str, version: str, run_id: str) -> Path:
    """The version's export directory, downloaded once per node into the model cache.

    Cached under name / version / training run id: a version number alone is not an identity (a
    registry that was recreated, or a model deleted and registered again, reuses numbers), and a
    stale cache entry would serve another model than the registry names.
    """
    from ml.registry import download_export

    cache = Path(os.environ.get(MODEL_CACHE_ENV) or Path(tempfile.gettempdir()) / "ct-serve-models")
    final = cache / name / f"{version}-{run_id}" if run_id else cache / name / version
    if (final / ".complete").is_file():
        return final / "export"
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    try:
        download_export(client, client.get_model_version_download_uri(name, version), staging)
        (staging / ".complete").write_text(datetime.now(UTC).isoformat())
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # atomic: a concurrent replica sees the whole export or none
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final / "export"


LOAD_NICENESS = 10  # model loads yield the CPU to requests being served (Linux: this thread only)


async def _in_low_priority_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a thread of its own at a lower CPU priority than request handling.

    A model load (download, safetensors, tokenizer) takes seconds of CPU. It runs beside serving: a
    replica swapping models in place keeps answering with the old one, and a replica started to
    replace a lost one shares the node's cores with the replicas carrying the load meanwhile. On
    Linux a thread's niceness is its own, so only the load yields; the thread ends with it (the
    worker threads that run inference keep their priority).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: Any = None, error: BaseException | None = None) -> None:
        if not done.done():  # the awaiting task may have been cancelled meanwhile
            done.set_exception(error) if error is not None else done.set_result(result)

    def run() -> None:
        if sys.platform == "linux":
            with contextlib.suppress(OSError):  # not allowed here: load at normal priority
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)
        try:
            result = fn(*args)
        except BaseException as err:
            result, error = None, err
        else:
            error = None
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the replica is going away
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="ct-model-load", daemon=True).start()
    return await done


def _model_fields(options: ServeOptions) -> tuple[Any, ...]:
    return (options.model_name, options.model_version, options.model_path, options.device, options.dtype)


class _Inferences:
    """The serving model's forward passes running in this replica, and when the last one ended.

    A shadow candidate (:class:`ShadowMirror`) waits for a quiet moment before each of its passes.
    Only this module's functions use it (Serve ships them to replicas by reference), so the
    replica's one instance is shared by the request threads and the shadow thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._ended = 0.0

    def __enter__(self) -> None:
        with self._lock:
            self._running += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._running -= 1
            self._ended = time.monotonic()

    def quiet_s(self) -> float:
        """Seconds since the last pass ended; 0 while one runs."""
        with self._lock:
            return 0.0 if self._running else time.monotonic() - self._ended


_SERVING = _Inferences()


class _InFlight:
    """Texts inside this replica's predict calls now, and the most seen lately.

    Adaptive batching sizes each batch to that recent peak: a lone client's text goes at once
    (a peak of 1 closes the batch at its first text), while 16 clients that all wait on the
    running batch come back together and fill the next one. The peak is the larger of the
    current and the previous ``window_s`` window, so the dip between two batches (every client
    answered, the next requests still on their way) does not shrink the next batch. Used on the
    replica's event loop only.
    """

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self.now = 0
        self._peak = 0
        self._previous = 0
        self._since = time.monotonic()

    def _roll(self) -> None:
        elapsed = time.monotonic() - self._since
        if elapsed >= self.window_s:
            self._previous = self._peak if elapsed < 2 * self.window_s else self.now
            self._peak = self.now
            self._since = time.monotonic()

    def enter(self, texts: int) -> None:
        self.now += texts
        self._roll()
        self._peak = max(self._peak, self.now)

    def leave(self, texts: int) -> None:
        self.now -= texts

    def recent_peak(self) -> int:
        self._roll()
        return max(self._peak, self._previous, self.now)


def _infer(classifier: Any, texts: list[str], threads: int) -> np.ndarray:
    """One forward pass over ``texts``, in a worker thread.

    The thread count is set here, not in ``reconfigure``: OpenMP keeps it per OS thread, so a
    worker that already ran inference would otherwise keep the old value.
    """
    import torch

    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with _SERVING:
        return classifier.predict_proba(texts, batch_size=len(texts))


def _assigned_cpus() -> int:
    try:
        import ray

        return max(1, round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # outside Ray
        return os.cpu_count() or 1


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve
        return uuid.uuid4().hex[:8]


def _authorize(request: Request) -> None:
    """Check the bearer token (when one is configured) before anything else of the request is read."""
    token = os.environ.get(API_TOKEN_ENV)
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise InputError(401, "this endpoint needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise InputError(401, "wrong bearer token")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError(400, f"Content-Length must be a number of bytes, got {quote(declared)}")
        if int(declared) > limit:
            raise InputError(413, f"the body has {declared} bytes; the limit is {limit} bytes")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise InputError(
            415, f"send the body as JSON with 'Content-Type: application/json', not {quote(ctype)}"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class _ItemFailed:
    """A batch item that failed on its own (after the batch was split): only its request fails."""

    error: BaseException


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------

api = FastAPI(
    title="Text classifier",
    version="1",
    description="Classifies text with the model the continuous_training DAG promoted (MLflow alias "
    "`champion`). Texts of concurrent requests are batched. Limits: see `GET /v1/model`.",
)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed JSON or a malformed X-Request-ID"},
    401: {
        "model": ErrorBody,
        "description": "Missing or wrong bearer token (when CT_SERVE_API_TOKEN is set)",
    },
    413: {"model": ErrorBody, "description": "Too many texts in one request, or a body over the size limit"},
    415: {"model": ErrorBody, "description": "A body that is not JSON"},
    422: {
        "model": ErrorBody,
        "description": "A body that breaks the schema: every problem named (10 at most)",
    },
    503: {"model": ErrorBody, "description": "No model loaded yet, or the service is overloaded"},
}
# The limits the OpenAPI document states: this replica's (max_texts_per_request, max_text_chars).
_contract_limits: tuple[int, int] = (ServeOptions().max_texts_per_request, ServeOptions().max_text_chars)


def _openapi() -> dict[str, Any]:
    """FastAPI's document, with the request body and limits that ``/v1/predict`` really enforces."""
    if api.openapi_schema is None:
        schema = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        predict = schema["paths"]["/v1/predict"]["post"]
        predict["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": predict_request_schema(*_contract_limits)}},
        }
        predict["parameters"] = [
            {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Your id for this request: echoed as `request_id`, kept in the log.",
                "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN, "maxLength": 128},
            }
        ]
        if os.environ.get(API_TOKEN_ENV):
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            for path in ("/v1/predict", "/v1/model", "/v1/models"):
                for operation in schema["paths"][path].values():
                    operation["security"] = [{"bearer": []}]
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


# The default application (route /) also answers under /<its dataset>; set per replica by
# _publish_route_alias (module-level on purpose: see _publish_limits).
_route_alias = ""


def _publish_route_alias(alias: str) -> None:
    """Make this replica's HTTP routes answer under ``alias`` too (``""``: under their route only)."""
    global _route_alias
    _route_alias = alias.rstrip("/")


class DatasetPrefix:
    """ASGI middleware: the default application (route ``/``) also answers under ``/<dataset>``.

    ``/agnews/v1/predict`` reaches it like ``/v1/predict``: the prefix moves into the ``root_path``
    (as Serve does with an application's own route prefix), so routing, redirects and the docs
    page's link to ``openapi.json`` work under both. Other prefixes are left alone: the route of a
    dataset that has no application of its own gets a 404 here, never this model's answer.
    ``alias`` None: the replica's (:func:`_publish_route_alias`).
    """

    def __init__(self, app: Any, alias: str | None = None) -> None:
        self.app = app
        self.alias = alias

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        alias = _route_alias if self.alias is None else self.alias
        if alias and scope["type"] in {"http", "websocket"}:
            root, path = scope.get("root_path", ""), scope["path"]
            route = path[len(root) :] if root and path.startswith(root) else path
            if route == alias or route.startswith(f"{alias}/"):
                scope = {**scope, "root_path": root + alias}
        await self.app(scope, receive, send)


api.add_middleware(DatasetPrefix)


def _serve_applications() -> dict[str, dict[str, Any]]:
    """Serve's own view of the cluster's applications: status, route, deployments (blocking).

    What ``serve.status()`` reads, plus each application's route prefix and deployed config.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    apps = {}
    for name, app in details.applications.items():
        config = app.deployed_app_config
        env = ((config.runtime_env or {}).get("env_vars") or {}) if config else {}
        apps[name] = {
            "status": str(getattr(app.status, "value", app.status)),
            "message": app.message or None,
            "route_prefix": app.route_prefix or "/",
            "deployments": sorted(app.deployments),
            "dataset": env.get("CT_DATASET"),
        }
    return apps


def _current_app_name() -> str | None:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # outside Serve
        return None


def _publish_limits(max_texts: int, max_chars: int) -> None:
    """Make the OpenAPI document state these limits.

    A module-level function on purpose: Serve ships the deployment class to replicas by value, with
    copies of the globals its methods use, so a method assigning this module's globals itself would
    change only its copies; a call into this function reaches the module the document is built from.
    """
    global _contract_limits
    if _contract_limits != (max_texts, max_chars):
        _contract_limits, api.openapi_schema = (max_texts, max_chars), None


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    error = InputError(422, problems[0] if problems else "invalid request", problems)
    return JSONResponse(error.body(), status_code=422)


@api.exception_handler(InputError)
async def _refused(request: Request, exc: InputError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _log_records(
    request_id: str,
    model: LoadedModel,
    texts: list[str],
    predictions: list[Prediction],
    rows: list[np.ndarray],
    role: str = "champion",
    latency_ms: float | None = None,
) -> list[dict[str, Any]]:
    """The prediction-log rows of one answered request: one per text.

    Defined above the deployment class on purpose: Serve pickles the class by value when it is
    decorated, with the module globals its methods use that exist at that moment.
    """
    import json

    now = datetime.now(UTC)
    labels = model.classifier.labels
    return [
        {
            "ts": now,
            "request_id": request_id,
            "item": i,
            "text": text,
            "label": p.label,
            "score": p.score,
            "scores": json.dumps({label: round(float(x), 6) for label, x in zip(labels, probs, strict=True)}),
            "model_name": model.name,
            "model_version": model.version,
            "model_run_id": model.run_id,
            "role": role,
            "latency_ms": latency_ms,
        }
        for i, (text, p, probs) in enumerate(zip(texts, predictions, rows, strict=True))
    ]


def _error_records(
    request_id: str, model: LoadedModel, texts: list[str], error: str, role: str, latency_ms: float | None
) -> list[dict[str, Any]]:
    """The prediction-log rows of a request ``model`` failed (label null, ``error`` set)."""
    now = datetime.now(UTC)
    return [
        {
            "ts": now,
            "request_id": request_id,
            "item": i,
            "text": text,
            "model_name": model.name,
            "model_version": model.version,
            "model_run_id": model.run_id,
            "role": role,
            "latency_ms": latency_ms,
            "error": error[:500],
        }
        for i, text in enumerate(texts)
    ]


def _canary_share(key: str, salt: str) -> float:
    """Where ``key`` falls in [0, 1): the same on every replica, so a client stays on one version
    for the whole canary (``salt``, the candidate's version, reshuffles clients between rollouts)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _predictions(labels: list[str], rows: list[np.ndarray], all_scores: bool) -> list[Prediction]:
    out = []
    for probs in rows:
        best = int(np.argmax(probs))
        out.append(
            Prediction(
                label=labels[best],
                score=float(probs[best]),
                scores={label: float(p) for label, p in zip(labels, probs, strict=True)}
                if all_scores
                else None,
            )
        )
    return out


class ShadowMirror:
    """Runs a shadow candidate on copies of served texts, in one thread of its own at low priority.

    :meth:`offer` never blocks and never fails a request: texts beyond ``queue_texts`` waiting are
    dropped (and counted). The thread takes up to ``max_batch`` waiting texts at a time, runs the
    candidate at niceness :data:`SHADOW_NICENESS` with ``threads`` CPU threads, one short pass at a
    time and only in the serving model's idle moments (:meth:`_predict`), so on a busy replica the
    serving model's requests keep the CPU and the GIL and the queue overflows instead; it hands the
    prediction-log rows to ``emit`` (on the event loop). Fault injection (``inject_*``) applies here
    as in a canary.
    """

    def __init__(
        self,
        model: LoadedModel,
        options: CandidateOptions,
        max_batch: int,
        emit: Callable[[list[dict[str, Any]], float, int], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.model, self.options, self.max_batch = model, options, max_batch
        self._emit, self._loop = emit, loop
        self._queue: deque[tuple[str, int, str]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = {"mirrored": 0, "answered": 0, "failed": 0, "dropped": 0}
        self._thread = threading.Thread(target=self._run, name="ct-shadow", daemon=True)
        self._thread.start()

    def offer(self, request_id: str, texts: list[str]) -> bool:
        with self._cond:
            if self._closed or len(self._queue) + len(texts) > self.options.shadow_queue_texts:
                self.stats["dropped"] += len(texts)
                return False
            self._queue.extend((request_id, i, text) for i, text in enumerate(texts))
            self.stats["mirrored"] += len(texts)
            self._cond.notify()
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self.stats["dropped"] += len(self._queue)
            self._queue.clear()
            self._cond.notify()

    def _take(self) -> list[tuple[str, int, str]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _predict(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """The candidate's probabilities, :data:`SHADOW_PASS_TEXTS` texts a pass, each pass started
        once the serving model has been idle :data:`SHADOW_QUIET_S`; and the seconds spent waiting.

        Low CPU priority alone is not enough: the shadow's Python code holds the GIL that request
        handling and the serving model's passes need (``benchmarks/shadow_bench.py``).
        """
        rows, waited = [], 0.0
        for start in range(0, len(texts), SHADOW_PASS_TEXTS):
            began = time.perf_counter()
            while _SERVING.quiet_s() < SHADOW_QUIET_S and not self._closed:
                time.sleep(SHADOW_QUIET_S / 4)
            waited += time.perf_counter() - began
            chunk = texts[start : start + SHADOW_PASS_TEXTS]
            rows.append(self.model.classifier.predict_proba(chunk, batch_size=len(chunk)))
        return np.concatenate(rows), waited

    def _run(self) -> None:
        import json

        import torch

        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)
        torch.set_num_threads(self.options.shadow_threads)
        labels = self.model.classifier.labels
        while (batch := self._take()) is not None:
            started = time.perf_counter()
            texts = [text for _, _, text in batch]
            error = None
            try:
                if self.options.inject_delay_ms:
                    time.sleep(self.options.inject_delay_ms / 1000)
                if self.options.inject_error_rate and random.random() < self.options.inject_error_rate:
                    raise RuntimeError("injected fault (candidate.inject_error_rate)")
                probs, waited = self._predict(texts)
                started += waited  # the shadow's latency is its compute time, not its waits
                if not np.isfinite(probs).all():
                    raise ValueError("no valid probabilities (NaN or inf)")
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
            latency_ms = (time.perf_counter() - started) * 1000
            now = datetime.now(UTC)
            base = {"model_name": self.model.name, "model_version": self.model.version}
            records = []
            for n, (request_id, item, text) in enumerate(batch):
                record = {**base, "ts": now, "request_id": request_id, "item": item, "text": text}
                record.update(model_run_id=self.model.run_id, role="shadow", latency_ms=latency_ms)
                if error is None:
                    row = probs[n]
                    best = int(np.argmax(row))
                    record.update(
                        label=labels[best],
                        score=float(row[best]),
                        scores=json.dumps(
                            {lb: round(float(x), 6) for lb, x in zip(labels, row, strict=True)}
                        ),
                    )
                else:
                    record["error"] = error[:500]
                records.append(record)
            self.stats["failed" if error else "answered"] += len(batch)
            with contextlib.suppress(RuntimeError):  # the loop closed: the replica is going away
                self._loop.call_soon_threadsafe(self._emit, records, latency_ms, len(batch) if error else 0)


def _retry_delays(longest_s: float) -> Iterator[float]:
    """Seconds between the retries of a load that waits for an alias: 1, 2, 4 ... ``longest_s``."""
    delay = 1.0
    while True:
        yield min(delay, longest_s)
        delay = min(2 * delay, longest_s)


def _waiting_detail(error: str | None, longest_s: float) -> str:
    """What a replica that waits for its model says to callers (HTTP 503) and in its log.

    Defined above the deployment class on purpose (Serve pickles the class by value with the
    module globals that exist when it is decorated).
    """
    detail = f"no model to serve yet (retrying every {longest_s:g} s at most): {error or 'still loading'}"
    if error and "has no alias" in error:
        detail += (
            ". No model was promoted to it yet: the continuous_training DAG sets the alias when it "
            "promotes one (or set it on a registered version in the MLflow UI)"
        )
    return detail


class HistoryCache:
    """The last few serving-history entries per model (``GET /v1/model``), read at most every
    ``ttl_s`` seconds per model, in a thread, with a fail-fast S3 client: a request waits at most
    ``wait_s`` on S3, and an S3 failure gives None (logged, and kept for ``ttl_s``), never an error."""

    def __init__(self, entries: int = 5, ttl_s: float = 30.0, wait_s: float = 2.0, store: Any = None) -> None:
        self.entries, self.ttl_s, self.wait_s = entries, ttl_s, wait_s
        self._store = store
        self._cached: dict[str, tuple[float, list[dict[str, Any]] | None]] = {}

    def _read(self, model: str) -> list[dict[str, Any]]:
        from ml.serving_history import read
        from ml.settings import load_settings

        settings = load_settings()
        if self._store is None:
            from ml.prediction_log import fail_fast_store
            from ml.storage import ObjectStore

            self._store = fail_fast_store(
                ObjectStore(settings), connect_timeout_s=1.0, read_timeout_s=2.0, retries=0
            )
        return read(settings, model, limit=self.entries, store=self._store, newest_first=True)

    async def get(self, model: str) -> list[dict[str, Any]] | None:
        hit = self._cached.get(model)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        try:
            entries = await asyncio.wait_for(asyncio.to_thread(self._read, model), self.wait_s)
        except Exception as err:  # S3 down or slow, an odd model name: /v1/model answers anyway
            log.warning("serving history of %s unavailable: %s", model, f"{type(err).__name__}: {err}"[:300])
            entries = None
        self._cached[model] = (time.monotonic(), entries)
        return entries


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=64,  # >= max_batch_size, or batches never fill
    health_check_period_s=10,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress(api)
class Classifier:
    def __init__(self) -> None:
        from ml.settings import load_settings

        settings = load_settings()  # the application's runtime_env: CT_DATASET is its dataset
        self._dataset = settings.dataset
        self._default_dataset = settings.serve_default_dataset
        self._registered_model = settings.registered_model
        self._route_alias = (
            f"/{settings.dataset}" if settings.dataset == settings.serve_default_dataset else ""
        )
        _publish_route_alias(self._route_alias)
        self._handles: dict[str, Any] = {}  # other applications' deployments (GET /v1/models)
        self._history = HistoryCache()
        self._model: LoadedModel | None = None
        self._options: ServeOptions | None = None
        self._load_error: str | None = None
        self._failed_request: str | None = None
        self._threads = 0
        self._reload_lock = asyncio.Lock()
        self._waiter: asyncio.Task | None = None  # retries an alias that did not load (nothing loaded yet)
        self._prediction_log = None
        self._candidate: LoadedModel | None = None  # beside the serving model during a staged rollout
        self._candidate_error: str | None = None
        self._candidate_options_loaded: ServeOptions | None = None
        self._shadow: ShadowMirror | None = None
        self._candidate_lock = asyncio.Lock()
        self._in_flight = _InFlight()
        self._batch_size = metrics.Histogram(
            "ct_serve_batch_size", description="Texts per forward pass.", boundaries=BATCH_BOUNDARIES
        )
        self._request_latency = metrics.Histogram(
            "ct_serve_request_latency_ms",
            description="Inference latency of a request in the replica (batch wait + forward passes).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model_name", "model_version", "role"),
        )
        self._texts = metrics.Counter(
            "ct_serve_texts",
            description="Texts classified (role: champion, canary, or shadow for mirrored copies).",
            tag_keys=("model_name", "model_version", "role"),
        )
        self._requests = metrics.Counter(
            "ct_serve_requests",
            description="Requests answered by a model version (role champion or canary), or mirrored "
            "batches run by a shadow candidate.",
            tag_keys=("model_name", "model_version", "role"),
        )
        self._errors = metrics.Counter(
            "ct_serve_request_errors",
            description="Requests (shadow: batches) a model version failed; a failed canary answer is "
            "retried on the serving model.",
            tag_keys=("model_name", "model_version", "role"),
        )
        self._shadow_dropped = metrics.Counter(
            "ct_serve_shadow_dropped", description="Mirrored texts dropped: the shadow queue was full."
        )
        self._model_info = metrics.Gauge(
            "ct_serve_model_info",
            description="1 for the model version this replica serves.",
            tag_keys=("model_name", "model_version"),
        )
        self._load_failures = metrics.Counter(
            "ct_serve_model_load_failures", description="Models that failed to load (old one kept)."
        )
        self._log_dropped = metrics.Counter(
            "ct_serve_prediction_log_dropped", description="Prediction-log rows dropped (buffer full)."
        )
        self._log_written = metrics.Counter(
            "ct_serve_prediction_log_written", description="Prediction-log rows written to S3."
        )

    # ---- configuration ------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        options = ServeOptions.model_validate(user_config or {})
        _publish_limits(options.max_texts_per_request, options.max_text_chars)
        self._classify.set_max_batch_size(options.max_batch_size)
        self._classify.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self._threads = options.torch_threads or _assigned_cpus()
        previous, self._options = self._options, options
        changed = self._model is None or previous is None or _model_fields(previous) != _model_fields(options)
        if changed and not self._promote_candidate(options):
            await self._load(options)
        self._configure_prediction_log(options)
        await self._configure_candidate(options)

    # ---- a candidate beside the serving model (staged rollouts) -------------------------

    def _candidate_model_options(self, options: ServeOptions) -> ServeOptions:
        candidate = options.candidate
        assert candidate is not None
        return options.model_copy(
            update={
                "model_name": candidate.model_name or options.model_name,
                "model_version": candidate.model_version,
                "model_path": candidate.model_path,
                "candidate": None,
            }
        )

    def _promote_candidate(self, options: ServeOptions) -> bool:
        """The new serving model is the candidate this replica already runs: swap it in, no load."""
        candidate = self._candidate
        if candidate is None or options.model_path or self._model is None:
            return False
        name = options.model_name or self._registered_model
        if (candidate.name, candidate.version) != (name, options.model_version.strip()):
            return False
        old, self._model = self._model, candidate
        self._load_error = self._failed_request = None
        self._model_info.set(0, tags={"model_name": old.name, "model_version": old.version})
        self._model_info.set(1, tags={"model_name": candidate.name, "model_version": candidate.version})
        log.info("candidate %s v%s promoted: it serves every request now", candidate.name, candidate.version)
        self._drop_candidate()
        return True

    def _drop_candidate(self) -> None:
        if self._shadow is not None:
            self._shadow.close()
            self._shadow = None
        self._candidate = None

    async def _configure_candidate(self, options: ServeOptions) -> None:
        """Load, change or remove the candidate ``options.candidate`` names.

        A candidate that fails to load never touches the serving model: the failure is reported by
        ``GET /v1/model`` (``candidate.load_error``) and the rollout stops there.
        """
        async with self._candidate_lock:
            wanted = options.candidate
            if wanted is None:
                if self._candidate is not None:
                    log.info("candidate %s v%s removed", self._candidate.name, self._candidate.version)
                self._drop_candidate()
                self._candidate_error = None
                return
            load_options = self._candidate_model_options(options)
            current = self._candidate
            same = (
                current is not None
                and self._candidate_options_loaded is not None
                and _model_fields(self._candidate_options_loaded) == _model_fields(load_options)
            )
            if not same:
                self._drop_candidate()
                self._candidate_error = None
                started = time.perf_counter()
                try:
                    model = await _in_low_priority_thread(load_model, load_options)
                except Exception as err:
                    self._load_failures.inc()
                    self._candidate_error = f"{load_options.reference()}: {type(err).__name__}: {err}"
                    log.error(
                        "candidate %s failed to load: %s", load_options.reference(), self._candidate_error
                    )
                    return
                self._candidate, self._candidate_options_loaded = model, load_options
                log.info(
                    "candidate %s v%s loaded in %.1f s (%s)",
                    model.name,
                    model.version,
                    time.perf_counter() - started,
                    wanted.mode,
                )
            if self._shadow is not None and (wanted.mode != "shadow" or self._shadow.options != wanted):
                self._shadow.close()
                self._shadow = None
            if wanted.mode == "shadow" and self._shadow is None and self._candidate is not None:
                self._shadow = ShadowMirror(
                    self._candidate,
                    wanted,
                    options.max_batch_size,
                    self._shadow_done,
                    asyncio.get_running_loop(),
                )

    def _shadow_done(self, records: list[dict[str, Any]], latency_ms: float, failed: int) -> None:
        """On the event loop: a shadow batch's rows into the prediction log, its metrics."""
        if not records:
            return
        tags = {
            "model_name": records[0]["model_name"],
            "model_version": records[0]["model_version"],
            "role": "shadow",
        }
        self._requests.inc(1, tags=tags)
        self._request_latency.observe(latency_ms, tags=tags)
        if failed:
            self._errors.inc(1, tags=tags)
        else:
            self._texts.inc(len(records), tags=tags)
        if self._prediction_log is not None:
            try:
                self._prediction_log.append(records)
            except Exception:
                log.exception("prediction log: could not buffer %d shadow rows", len(records))

    def _candidate_info(self) -> CandidateInfo | None:
        options = self._options.candidate if self._options else None
        if options is None:
            return None
        model = self._candidate
        shadow = self._shadow
        return CandidateInfo(
            name=model.name
            if model
            else (
                options.model_name
                or (self._options.model_name if self._options else "")
                or self._registered_model
            ),
            version=model.version if model else None,
            run_id=model.run_id if model else None,
            requested=options.reference(),
            mode=options.mode,
            fraction=options.fraction if options.mode == "canary" else 0.0,
            client_key_header=options.client_key_header,
            loaded_at=model.loaded_at if model else None,
            load_error=self._candidate_error,
            shadow=dict(shadow.stats) if shadow else None,
        )

    async def _load(self, options: ServeOptions) -> None:
        """Load the model ``options`` names, replacing the one serving (if any) once it loaded.

        With nothing loaded yet and the model named by an alias (the default, ``champion``), a
        failed load leaves the replica up: ``/v1/predict`` and ``/readyz`` answer 503 naming the
        problem, the health check passes (restarting the replica would not create a champion), and
        the load is retried in the background, at most ``model_retry_s`` apart, until it succeeds
        or another ``user_config`` arrives. A version number (what the DAG's deploy task sends)
        that does not load fails the replica, as before: the deploy task sees it and rolls back.
        """
        self._stop_waiting()
        if self._model is not None or not options.waits_for_alias():
            await self._swap_model(options)
            return
        try:
            await self._swap_model(options)
        except Exception:
            log.warning("%s", _waiting_detail(self._load_error, options.model_retry_s))
            self._waiter = asyncio.get_running_loop().create_task(self._wait_for_model(options))

    async def _wait_for_model(self, options: ServeOptions) -> None:
        attempts = 1
        for delay in _retry_delays(options.model_retry_s):
            await asyncio.sleep(delay)
            attempts += 1
            try:
                await self._swap_model(options)
            except Exception:
                if delay >= options.model_retry_s:  # at the longest interval: one line per retry
                    log.warning("attempt %d: %s", attempts, _waiting_detail(self._load_error, delay))
                continue
            log.info("%s loaded after %d attempts", options.reference(), attempts)
            break
        if self._waiter is asyncio.current_task():
            self._waiter = None

    def _stop_waiting(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()  # a load it runs finishes in its thread; the result is dropped
            self._waiter = None

    def _waiting(self) -> bool:
        return self._model is None and self._waiter is not None and not self._waiter.done()

    async def _swap_model(self, options: ServeOptions) -> None:
        async with self._reload_lock:
            started = time.perf_counter()
            log.info("loading model %s", options.reference())
            try:
                model = await _in_low_priority_thread(load_model, options)
            except Exception as err:
                self._load_failures.inc()
                self._load_error = f"{options.reference()}: {type(err).__name__}: {err}"
                self._failed_request = options.reference()
                if self._model is None:
                    raise  # nothing to fall back to: the replica must not start
                log.error(
                    "model %s failed to load; still serving %s v%s: %s",
                    options.reference(),
                    self._model.name,
                    self._model.version,
                    self._load_error,
                )
                return
            old, self._model, self._load_error, self._failed_request = self._model, model, None, None
            if old is not None:
                self._model_info.set(0, tags={"model_name": old.name, "model_version": old.version})
            self._model_info.set(1, tags={"model_name": model.name, "model_version": model.version})
            log.info(
                "serving %s v%s (%s) on %s after %.1f s",
                model.name,
                model.version,
                model.source,
                model.classifier.device,
                time.perf_counter() - started,
            )

    def _configure_prediction_log(self, options: ServeOptions) -> None:
        if not options.prediction_log or self._prediction_log is not None:
            return
        from ml.prediction_log import PredictionLogger
        from ml.settings import load_settings
        from ml.storage import ObjectStore

        self._prediction_log = PredictionLogger(
            ObjectStore(load_settings()),
            writer_id=_replica_id(),
            flush_interval_s=options.prediction_log_flush_s,
            max_buffer_rows=options.prediction_log_max_rows,
            on_written=lambda n: self._log_written.inc(n),
            on_dropped=lambda n: self._log_dropped.inc(n),
        )
        self._prediction_log.start()

    async def check_health(self) -> None:
        if self._options is None:
            # No user_config (`serve run serve.app:classifier_app`, or a config without one): Serve
            # never calls reconfigure. Its first health check comes right after the constructor:
            # apply the defaults there, which load the registered model's champion.
            await self.reconfigure({})
        if self._model is None and not self._waiting():
            raise RuntimeError(f"no model loaded: {self._load_error or 'still starting'}")

    async def __del__(self) -> None:
        self._stop_waiting()
        self._drop_candidate()
        if self._prediction_log is not None:
            await self._prediction_log.close()

    # ---- endpoints ----------------------------------------------------------------------

    @api.get("/healthz", summary="The process answers")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="A model is loaded and serving", responses={503: {"description": "No model"}})
    async def readyz(self) -> JSONResponse:
        if self._model is None and self._waiting():
            detail = _waiting_detail(self._load_error, (self._options or ServeOptions()).model_retry_s)
            return JSONResponse({"status": "waiting", "detail": detail}, status_code=503)
        if self._model is None:
            return JSONResponse({"status": "loading", "detail": self._load_error}, status_code=503)
        return JSONResponse(
            {"status": "ready", "model": {"name": self._model.name, "version": self._model.version}}
        )

    @api.get(
        "/v1/model",
        summary="The model this replica serves",
        response_model=ModelInfo,
        responses={code: ERROR_RESPONSES[code] for code in (401, 503)},
    )
    async def model_info(self, request: Request) -> ModelInfo:
        _authorize(request)
        model, options = self._require_model(), self._options or ServeOptions()
        classifier = model.classifier
        return ModelInfo(
            name=model.name,
            version=model.version,
            labels=classifier.labels,
            run_id=model.run_id,
            source=model.source,
            max_length=classifier.max_length,
            device=str(classifier.device),
            dtype=str(classifier.model.dtype).removeprefix("torch."),
            loaded_at=model.loaded_at,
            requested=options.reference(),
            last_load_error=self._load_error,
            failed_request=self._failed_request,
            candidate=self._candidate_info(),
            history=await self._history.get(model.name),
            limits={
                "max_texts_per_request": options.max_texts_per_request,
                "max_text_chars": options.max_text_chars,
                "max_batch_size": options.max_batch_size,
                "batch_wait_timeout_s": options.batch_wait_timeout_s,
                "adaptive_batching": options.adaptive_batching,
                "auth": "bearer" if os.environ.get(API_TOKEN_ENV) else "none",
            },
        )

    def describe(self) -> dict[str, Any]:
        """What this replica serves: for ``GET /v1/models`` of another application (a handle call)."""
        model, options = self._model, self._options or ServeOptions()
        return {
            "dataset": self._dataset,
            "registered_model": options.model_name or self._registered_model,
            "model": ModelRef(name=model.name, version=model.version, run_id=model.run_id).model_dump()
            if model
            else None,
            "route_alias": self._route_alias,
            "last_load_error": self._load_error,
            "candidate": info.model_dump(include={"name", "version", "mode", "fraction", "load_error"})
            if (info := self._candidate_info())
            else None,
        }

    @api.get(
        "/v1/models",
        summary="Every served model: one Serve application per dataset",
        response_model=ServedModels,
        responses={code: ERROR_RESPONSES[code] for code in (401, 503)},
    )
    async def models(self, request: Request) -> ServedModels:
        """Each application of this service (Serve's own list) and what its replicas serve.

        One application that does not answer within a short timeout (or has no replica) is listed
        with its Serve status and an ``error``; it never fails the listing.
        """
        _authorize(request)
        try:
            apps = await asyncio.wait_for(asyncio.to_thread(_serve_applications), 4 * MODELS_TIMEOUT_S)
        except Exception as err:
            detail = f"Serve's list of applications is unavailable: {type(err).__name__}: {err}"
            raise InputError(503, detail) from err
        ours = {name: app for name, app in apps.items() if DEPLOYMENT_NAME in app["deployments"]}
        own = _current_app_name()
        entries = await asyncio.gather(*(self._served_model(n, app, n == own) for n, app in ours.items()))
        entries.sort(key=lambda e: (not e.default, e.route_prefix))
        return ServedModels(default_dataset=self._default_dataset, models=entries)

    async def _served_model(self, name: str, app: dict[str, Any], own: bool) -> ServedModel:
        info: dict[str, Any] = {}
        error = None
        try:
            info = self.describe() if own else await asyncio.wait_for(self._describe(name), MODELS_TIMEOUT_S)
        except TimeoutError:
            error = f"no answer from the application within {MODELS_TIMEOUT_S:g} s"
        except Exception as err:
            error = f"{type(err).__name__}: {quote(str(err), 200)}"
        dataset = info.get("dataset") or app["dataset"]
        model = info.get("model") or {}
        route = app["route_prefix"]
        alias = info.get("route_alias") or ""
        return ServedModel(
            app=name,
            dataset=dataset,
            registered_model=model.get("name") or info.get("registered_model"),
            version=model.get("version"),
            run_id=model.get("run_id"),
            route_prefix=route,
            routes=[route, alias] if alias and route == "/" else [route],
            default=bool(dataset) and dataset == self._default_dataset,
            status=app["status"],
            message=app["message"],
            last_load_error=info.get("last_load_error"),
            candidate=info.get("candidate"),
            error=error,
        )

    async def _describe(self, app_name: str) -> dict[str, Any]:
        handle = self._handles.get(app_name)
        if handle is None:
            handle = serve.get_deployment_handle(
                DEPLOYMENT_NAME, app_name=app_name, _check_exists=False, _record_telemetry=False
            )
            self._handles[app_name] = handle
        response = handle.describe.remote()
        try:
            return await response
        except asyncio.CancelledError:  # timed out: do not leave the call queued at that application
            response.cancel()
            raise

    @api.post(
        "/v1/predict",
        summary="Classify texts",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses={code: ERROR_RESPONSES[code] for code in (400, 401, 413, 415, 422, 503)},
    )
    async def predict(self, request: Request, response: Response) -> PredictResponse:
        """Body: ``{"texts": [...]}`` or ``{"text": "..."}`` (the schema below has the limits)."""
        _authorize(request)  # first: an unauthenticated body is never read
        options = self._options or ServeOptions()
        request_id = check_request_id(request.headers.get("x-request-id")) or uuid.uuid4().hex
        limits = (options.max_texts_per_request, options.max_text_chars)
        raw = await _read_body(request, max_body_bytes(*limits))
        if len(raw) > 256 * 1024:  # parsing a big body must not stall the event loop of other requests
            body = await asyncio.to_thread(parse_predict_body, raw, *limits)
        else:
            body = parse_predict_body(raw, *limits)
        texts = body.texts
        champion = self._require_model()  # one model for the whole request, even during a swap
        model, role = self._route(request, request_id, options)
        rows, latency_ms = None, 0.0
        if role == "canary":
            started = time.perf_counter()
            try:
                rows, latency_ms = await self._answer(model, texts, options.candidate)
            except Exception as err:  # the client must not pay for the candidate: the champion answers
                detail = err.message if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
                latency_ms = (time.perf_counter() - started) * 1000
                self._failed(request_id, model, texts, detail, role, latency_ms)
                model, role, rows = champion, "champion", None
        if rows is None:
            try:
                rows, latency_ms = await self._answer(model, texts)
            except InputError as err:
                self._failed(request_id, model, texts, err.message, role, None)
                raise
        tags = {"model_name": model.name, "model_version": model.version, "role": role}
        self._request_latency.observe(latency_ms, tags=tags)
        self._texts.inc(len(texts), tags=tags)
        self._requests.inc(1, tags=tags)
        all_scores = body.return_all_scores or options.return_all_scores
        predictions = _predictions(model.classifier.labels, rows, all_scores)
        self._capture(request_id, model, texts, predictions, rows, role, latency_ms)
        if (
            self._shadow is not None
            and role == "champion"
            and not request_id.startswith(PIPELINE_REQUEST_PREFIX)
        ) and not self._shadow.offer(request_id, texts):
            self._shadow_dropped.inc(len(texts))
        response.headers["X-Model-Name"] = model.name
        response.headers["X-Model-Version"] = model.version
        response.headers["X-Model-Role"] = role
        return PredictResponse(
            model=ModelRef(name=model.name, version=model.version, run_id=model.run_id),
            role=role,
            request_id=request_id,
            predictions=predictions,
        )

    def _route(self, request: Request, request_id: str, options: ServeOptions) -> tuple[LoadedModel, str]:
        """Which model answers: the canary for its share of client keys, else the serving model."""
        candidate, wanted = self._candidate, options.candidate
        if (
            candidate is not None
            and wanted is not None
            and wanted.mode == "canary"
            and wanted.fraction > 0
            and not request_id.startswith(PIPELINE_REQUEST_PREFIX)  # smoke tests check the champion
        ):
            key = request.headers.get(wanted.client_key_header) or request_id
            if _canary_share(key, candidate.version) < wanted.fraction:
                return candidate, "canary"
        return self._require_model(), "champion"

    async def _answer(
        self, model: LoadedModel, texts: list[str], fault: CandidateOptions | None = None
    ) -> tuple[list[np.ndarray], float]:
        """Probabilities of ``texts`` from ``model`` (batched with other requests) and the time it
        took in ms; :class:`InputError` 500 naming the text that failed or the invalid output.
        ``fault``: a candidate's injected delay and errors (rollout drills)."""
        started = time.perf_counter()
        if fault is not None and fault.inject_delay_ms:
            await asyncio.sleep(fault.inject_delay_ms / 1000)
        if fault is not None and fault.inject_error_rate and random.random() < fault.inject_error_rate:
            raise InputError(
                500, f"model {model.name} v{model.version}: injected fault (candidate.inject_error_rate)"
            )
        options = self._options or ServeOptions()
        self._in_flight.enter(len(texts))
        try:
            if options.adaptive_batching:  # read when the batch's first text is queued
                peak = self._in_flight.recent_peak()
                self._classify.set_max_batch_size(max(1, min(options.max_batch_size, peak)))
            rows = await asyncio.gather(*(self._classify((text, model)) for text in texts))
        finally:
            self._in_flight.leave(len(texts))
        failed = [(i, row.error) for i, row in enumerate(rows) if isinstance(row, _ItemFailed)]
        if failed:
            i, err = failed[0]
            where = "text" if len(texts) == 1 else f"texts[{i}]"
            raise InputError(
                500, f"{where} could not be classified: {type(err).__name__}: {quote(str(err), 160)}"
            )
        if invalid := [i for i, row in enumerate(rows) if not np.isfinite(row).all()]:
            raise InputError(  # a misbehaving model: the deploy's smoke test sees this and rolls back
                500,
                f"model {model.name} v{model.version} gave no valid probabilities (NaN or inf) "
                f"for {len(invalid)} of {len(texts)} texts",
            )
        return rows, (time.perf_counter() - started) * 1000

    def _failed(
        self,
        request_id: str,
        model: LoadedModel,
        texts: list[str],
        error: str,
        role: str,
        latency_ms: float | None,
    ) -> None:
        """A model failed a request: counted, and logged (rows with ``error``) for the rollout's checks."""
        self._errors.inc(1, tags={"model_name": model.name, "model_version": model.version, "role": role})
        if role == "canary":
            log.warning(
                "canary %s v%s failed request %s; the champion answers it: %s",
                model.name,
                model.version,
                request_id,
                error,
            )
        if self._prediction_log is None:
            return
        try:
            self._prediction_log.append(_error_records(request_id, model, texts, error, role, latency_ms))
        except Exception:
            log.exception("prediction log: could not buffer the failure of request %s", request_id)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _classify(self, items: list[tuple[str, LoadedModel]]) -> list[np.ndarray | _ItemFailed]:
        """Class probabilities for a batch of (text, model) items, in order.

        Items carry their model: during a swap one batch may mix requests that started on the old
        model with requests on the new one; each group runs on its own model. Texts of different
        requests share this batch, so one text that breaks the forward pass must not fail the
        others: a failing group is split in halves and retried, down to the single items that fail
        on their own, which come back as :class:`_ItemFailed` (their requests get the error).
        """
        self._batch_size.observe(len(items))
        out: list[np.ndarray | _ItemFailed | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (_, model) in enumerate(items):
            groups.setdefault(id(model), []).append(i)
        for indices in groups.values():
            model = items[indices[0]][1]
            texts = [items[i][0] for i in indices]
            for i, row in zip(indices, await self._infer_isolated(model, texts), strict=True):
                out[i] = row
        return out

    async def _infer_isolated(self, model: LoadedModel, texts: list[str]) -> list[np.ndarray | _ItemFailed]:
        try:
            # in a thread: the event loop keeps accepting requests (and filling the next batch)
            return list(await asyncio.to_thread(_infer, model.classifier, texts, self._threads))
        except Exception as err:
            if len(texts) == 1:
                log.warning(
                    "a text failed on its own (%d chars): %s: %s", len(texts[0]), type(err).__name__, err
                )
                return [_ItemFailed(err)]
            log.warning(
                "a batch of %d texts failed (%s); retrying it in halves", len(texts), type(err).__name__
            )
            half = len(texts) // 2
            return [
                *(await self._infer_isolated(model, texts[:half])),
                *(await self._infer_isolated(model, texts[half:])),
            ]

    # ---- helpers ------------------------------------------------------------------------

    def _require_model(self) -> LoadedModel:
        if self._model is None and self._waiting():
            retry_s = (self._options or ServeOptions()).model_retry_s
            raise InputError(503, _waiting_detail(self._load_error, retry_s))
        if self._model is None:
            raise InputError(503, f"no model loaded yet: {self._load_error or 'starting'}")
        return self._model

    def _capture(
        self,
        request_id: str,
        model: LoadedModel,
        texts: list[str],
        predictions: list[Prediction],
        rows: list[np.ndarray],
        role: str = "champion",
        latency_ms: float | None = None,
    ) -> None:
        if self._prediction_log is None:
            return
        try:
            self._prediction_log.append(
                _log_records(request_id, model, texts, predictions, rows, role, latency_ms)
            )
        except Exception:  # the client has its answer; a capture problem must not turn it into a 500
            log.exception("prediction log: could not buffer %d rows of request %s", len(texts), request_id)
            self._log_dropped.inc(len(texts))


classifier_app = Classifier.bind()
