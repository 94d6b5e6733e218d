"""The serving history (ml/serving_history.py) without services: entry validation, appends under
concurrent writers, read order, the previously serving version, key safety, the MLflow tags (and
that MLflow being down never fails a recording), the history pages of the ct_reports plugin with
hostile entries, and the /v1/model history cache. tests/integration/test_serving_history.py runs
the same against the local stack's S3, MLflow and Airflow."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest
from pydantic import ValidationError

from ml import serving_history as sh
from ml.serving_history_page import render_history_page, render_index_page
from ml.settings import Settings
from ml.storage import ObjectInfo
from tests.conftest import REPO_ROOT
from tests.unit.test_report_safety import HOSTILE, Elements

sys.path.insert(0, str(REPO_ROOT / "plugins"))

MODEL = "agnews-classifier"
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


class MemoryStore:
    """The parts of ObjectStore the history uses, in memory and thread-safe; ``hook(op, key)`` runs
    before each operation (to interleave writers)."""

    bucket = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.hook = lambda op, key: None

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> str:
        self.hook("put", key)
        with self.lock:
            self.objects[key] = bytes(data)
        return "etag"

    def get_bytes(self, key: str) -> bytes:
        self.hook("get", key)
        with self.lock:
            return self.objects[key]  # KeyError when missing

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.hook("list", prefix)
        with self.lock:
            keys = sorted(k for k in self.objects if k.startswith(prefix))
        for key in keys:
            yield ObjectInfo(key, "etag", 0, None)

    def subfolders(self, prefix: str) -> list[str]:
        with self.lock:
            rest = {k[len(prefix) :].split("/", 1)[0] for k in self.objects if k.startswith(prefix)}
        return sorted(f"{prefix}{r}/" for r in rest)

    def jsonl_ids(self, model: str = MODEL) -> list[str]:
        lines = self.objects[sh.history_key(model)].decode().splitlines()
        return [json.loads(line)["id"] for line in lines]

    def entry_ids(self, model: str = MODEL) -> set[str]:
        return {k.rsplit("-", 1)[1].removesuffix(".json") for k in self.objects if "/entries/" in k}


@pytest.fixture
def settings() -> Settings:
    return Settings(dataset="agnews")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def add(settings, store, action="deploy", frm=None, to="1", result="ok", minutes=0, **extra) -> dict:
    fields = {
        "model": MODEL,
        "dataset": "agnews",
        "action": action,
        "from_version": frm,
        "to_version": to,
        "result": result,
        "actor": "scheduled__2026-03-01",
        "reason": "test",
        "seconds": 1.5,
        "at": T0 + timedelta(minutes=minutes),
        **extra,
    }
    return sh.record(settings, **fields, store=store, mlflow=False)


# --- entries ----------------------------------------------------------------------------------


def test_an_entry_is_validated_and_serialised():
    entry = sh.HistoryEntry(
        model=MODEL, dataset="agnews", action="pin", from_version=3, to_version="5", result="ok",
        actor="user:ana", reason="hold v5", seconds=12.0, at=datetime(2026, 3, 1, 11, 0, 1, tzinfo=UTC),
        detail="x" * 5000,
    )  # fmt: skip
    data = entry.to_dict()
    assert data["from_version"] == "3" and data["to_version"] == "5"
    assert data["at"] == "2026-03-01T11:00:01.000000Z"
    assert len(data["detail"]) == sh.MAX_DETAIL_CHARS and data["detail"].endswith("…")
    assert set(data) == {
        "model", "dataset", "action", "from_version", "to_version", "result", "at", "actor",
        "reason", "seconds", "detail", "id",
    }  # fmt: skip
    assert sh.HistoryEntry.model_validate(data) == entry  # what is stored reads back the same
    with pytest.raises(ValidationError, match="surprise"):
        sh.HistoryEntry.model_validate({**data, "surprise": 1})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("action", "delete"),
        ("action", "Deploy"),
        ("result", "maybe"),
        ("model", "../other"),
        ("actor", ""),
        ("seconds", -1),
        ("at", datetime(2026, 3, 1)),  # naive time
        ("to_version", 1.5),
    ],
)
def test_invalid_entries_are_refused_before_anything_is_written(settings, store, field, value):
    with pytest.raises(ValidationError):
        add(settings, store, **{field: value})
    assert store.objects == {}


@pytest.mark.parametrize(
    "name", ["", "..", "a/b", "../x", "a..b", ".hidden", "a b", "a%2Fb", "a\nb", "ä", "x" * 201, "-x"]
)
def test_unsafe_model_names_are_refused(settings, store, name):
    with pytest.raises(ValueError, match="not safe as a storage key segment"):
        sh.check_model_name(name)
    with pytest.raises(ValueError):
        sh.read(settings, name, store=store)
    with pytest.raises(ValueError):
        sh.history_key(name)


def test_safe_names_make_keys_under_reports_serving():
    assert sh.check_model_name("agnews-classifier_v2.1") == "agnews-classifier_v2.1"
    assert sh.history_key(MODEL) == f"reports/serving/{MODEL}/history.jsonl"


# --- appending and reading ----------------------------------------------------------------------


def test_record_writes_an_entry_object_and_the_history(settings, store):
    entry = add(settings, store)
    entry_object = f"reports/serving/{MODEL}/entries/20260301T100000000000Z-{entry['id']}.json"
    assert sorted(store.objects) == [entry_object, sh.history_key(MODEL)]
    assert json.loads(store.objects[entry_object]) == entry
    assert store.jsonl_ids() == [entry["id"]]


def test_read_is_oldest_first_and_limit_keeps_the_newest(settings, store):
    # recorded out of order: read sorts by time
    ids = {m: add(settings, store, to=str(m), minutes=m)["id"] for m in (3, 1, 2, 5, 4)}
    assert [e["id"] for e in sh.read(settings, MODEL, store=store)] == [ids[m] for m in (1, 2, 3, 4, 5)]
    assert [e["to_version"] for e in sh.read(settings, MODEL, limit=2, store=store)] == ["4", "5"]
    newest = sh.read(settings, MODEL, limit=2, store=store, newest_first=True)
    assert [e["to_version"] for e in newest] == ["5", "4"]
    assert sh.read(settings, MODEL, limit=0, store=store) == []
    assert sh.read(settings, "no-such-model", store=store) == []


def test_read_adds_entries_missing_from_a_stale_or_lost_history_file(settings, store):
    first = add(settings, store, minutes=1)
    second = add(settings, store, to="2", minutes=2)
    store.objects[sh.history_key(MODEL)] = (json.dumps(first) + "\n{broken\n").encode()  # stale + junk
    assert [e["id"] for e in sh.read(settings, MODEL, store=store)] == [first["id"], second["id"]]
    del store.objects[sh.history_key(MODEL)]
    assert [e["id"] for e in sh.read(settings, MODEL, store=store)] == [first["id"], second["id"]]


def test_two_writers_racing_on_the_history_file_lose_nothing(settings, store):
    """A lists the entries before B's exists; B then records completely; A's history.jsonl (without
    B's entry) lands last. A must see B's entry when it lists again, and rebuild."""
    a_listed, b_done = threading.Event(), threading.Event()
    writes = []

    def hook(op: str, key: str) -> None:
        name = threading.current_thread().name
        if name == "A" and op == "put" and key.endswith("history.jsonl"):
            writes.append("A")
            if len(writes) == 1:
                a_listed.set()
                assert b_done.wait(10)
        if name == "B" and op == "put" and "/entries/" in key:
            assert a_listed.wait(10)

    store.hook = hook
    results = {}
    threads = [
        threading.Thread(
            target=lambda n=n, m=m: results.update({n: add(settings, store, to=n, minutes=m)}), name=n
        )
        for n, m in (("A", 1), ("B", 2))
    ]
    threads[0].start()
    threads[1].start()
    threads[1].join(10)
    b_done.set()
    threads[0].join(10)
    assert set(results) == {"A", "B"}
    assert writes == ["A", "A"], "A did not rebuild after finding B's entry"
    assert store.jsonl_ids() == [results["A"]["id"], results["B"]["id"]]


def test_many_concurrent_writers_lose_nothing(settings, store):
    import random

    store.hook = lambda op, key: time.sleep(random.random() / 500)
    errors = []

    def writer(w: int) -> None:
        try:
            for i in range(8):
                add(settings, store, to=str(w), minutes=w * 10 + i)
        except Exception as err:  # pragma: no cover - shown by the assert below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(store.entry_ids()) == 48
    assert set(store.jsonl_ids()) == store.entry_ids()  # the file holds every entry, once
    assert len(store.jsonl_ids()) == 48


# --- the previously serving version ------------------------------------------------------------


def test_previous_serving_version(settings, store):
    assert sh.previous_serving_version(settings, MODEL, store=store) is None
    add(settings, store, to="1", minutes=1)
    assert sh.previous_serving_version(settings, MODEL, store=store) is None  # only one ever served
    add(settings, store, frm="1", to="2", minutes=2)
    add(settings, store, frm="2", to="3", result="rolled_back", minutes=3, detail="smoke test failed")
    add(settings, store, "auto_rollback", frm="3", to="2", minutes=4)  # v2 kept serving
    add(settings, store, "pin", frm="2", to="9", result="failed", minutes=5)
    assert sh.last_serving_change(settings, MODEL, store=store)["to_version"] == "2"
    assert sh.previous_serving_version(settings, MODEL, store=store) == "1"
    add(settings, store, "rollback", frm="2", to="1", minutes=6)
    assert sh.previous_serving_version(settings, MODEL, store=store) == "2"  # back again
    assert sh.previous_serving_version(settings, MODEL, current="2", store=store) == "1"
    assert sh.previous_serving_version(settings, MODEL, current="7", store=store) == "1"  # not in it


# --- MLflow ------------------------------------------------------------------------------------


def test_tag_keys_and_values_are_short_single_lines():
    entry = sh.HistoryEntry(
        model=MODEL, dataset="agnews", action="rollback", from_version="7", to_version="5", result="ok",
        actor="user:ana (manual__2026)", reason="v7 mislabels\nsports " * 50, detail="boom\n" * 400,
        at=datetime(2026, 3, 1, 10, 4, 5, 678000, tzinfo=UTC),
    )  # fmt: skip
    assert sh.tag_key(entry) == "serving.rollback.20260301T100405678000Z"
    value = sh.tag_value(entry)
    assert value.startswith("ok: v7 -> v5; by user:ana (manual__2026); v7 mislabels sports")
    assert "\n" not in value and len(value) <= sh.MAX_TAG_VALUE_CHARS
    assert "(this version was replaced)" in sh.tag_value(entry, "from")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_down_never_fails_a_recording(store, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = Settings(dataset="agnews", mlflow_tracking_uri=f"http://127.0.0.1:{_closed_port()}")
    with caplog.at_level(logging.WARNING, logger="ml.serving_history"):
        entry = sh.record(
            settings, model=MODEL, dataset="agnews", action="deploy", from_version="1", to_version="2",
            result="ok", actor="run", store=store,
        )  # fmt: skip
    assert store.jsonl_ids() == [entry["id"]]
    assert "could not tag agnews-classifier v2 in MLflow" in caplog.text
    assert "could not tag agnews-classifier v1 in MLflow" in caplog.text


# --- links ---------------------------------------------------------------------------------------


def test_serving_history_url():
    settings = Settings(report_viewer_url="https://airflow.example.com/ct/reports/")
    assert sh.serving_history_url(settings, MODEL) == f"https://airflow.example.com/ct/serving/{MODEL}"
    assert sh.serving_history_url(settings) == "https://airflow.example.com/ct/serving/"
    plain = Settings(report_viewer_url="")
    assert (
        sh.serving_history_url(plain, MODEL)
        == f"{plain.s3_url}/ct-data/reports/serving/{MODEL}/history.jsonl"
    )
    assert sh.history_page_path(MODEL) == f"/ct/serving/{MODEL}"
    with pytest.raises(ValueError):
        sh.serving_history_url(settings, "../x")


# --- the pages -----------------------------------------------------------------------------------


def hostile_history(settings, store) -> list[dict]:
    entries = []
    for i, payload in enumerate(HOSTILE):
        entries.append(
            add(settings, store, "pin", frm=str(i), to=str(i + 1), minutes=i, reason=payload,
                actor=f"user:{payload}", detail=payload, result=("ok", "failed", "rolled_back")[i % 3])
        )  # fmt: skip
    return entries


def test_the_history_page_shows_hostile_entries_as_text(settings, store):
    entries = hostile_history(settings, store)
    html = render_history_page(MODEL, sh.read(settings, MODEL, store=store))
    page = Elements(html)
    assert not page.injected(), page.injected()
    assert page.scripts == []
    tags = [tag for tag, _ in page.tags]
    assert "script" not in tags and "img" not in tags and "iframe" not in tags
    assert tags.count("tr") == len(entries) + 1 and tags.count("circle") >= len(entries)
    text = "".join(page.text)
    for payload in HOSTILE:
        assert payload in text  # shown, as text
    # newest first in the table
    rows = [attrs["data-id"] for tag, attrs in page.tags if tag == "tr" and "data-id" in attrs]
    assert rows == [e["id"] for e in reversed(entries)]
    assert 'id="timeline"' in html and "<path" in html


def test_the_index_lists_models(settings, store):
    add(settings, store)
    html = render_index_page({MODEL: sh.read(settings, MODEL, store=store)[-1], "other": None})
    page = Elements(html)
    assert [a["href"] for t, a in page.tags if t == "a"] == [MODEL, "other"]
    assert sh.models_with_history(settings, store=store) == [MODEL]


class PluginStore(MemoryStore):
    shared: ClassVar[MemoryStore] = MemoryStore()

    def __init__(self, settings=None) -> None:
        self.__dict__ = self.shared.__dict__


@pytest.fixture
def history_client(monkeypatch, settings):
    import ct_reports_plugin
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    import ct_airflow.settings
    import ml.storage

    PluginStore.shared = MemoryStore()
    monkeypatch.setattr(ml.storage, "ObjectStore", PluginStore)
    monkeypatch.setattr(ct_airflow.settings, "pipeline_settings", lambda: settings)
    ct_reports_plugin.app.dependency_overrides[get_user] = lambda: object()
    try:
        yield TestClient(ct_reports_plugin.app), PluginStore.shared
    finally:
        ct_reports_plugin.app.dependency_overrides.clear()


def test_the_plugin_serves_the_history_inert(history_client, settings):
    client, store = history_client
    assert client.get("/serving/").text.count("No model has a serving history yet") == 1
    hostile_history(settings, store)
    response = client.get(f"/serving/{MODEL}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "script-src 'none'" in policy and "default-src 'none'" in policy and "sandbox" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert not Elements(response.text).injected()
    index = client.get("/serving/")
    assert index.status_code == 200 and f'href="{MODEL}"' in index.text
    for bad in ("..%2Fx", "a%20b", "no-such-model"):
        assert client.get(f"/serving/{bad}").status_code == 404, bad


# --- /v1/model's history -------------------------------------------------------------------------


class FailingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def get_bytes(self, key: str) -> bytes:
        raise ConnectionRefusedError("S3 is down")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls += 1
        raise ConnectionRefusedError("S3 is down")


def test_the_model_info_history_cache(settings, store, monkeypatch, caplog):
    pytest.importorskip("ray")
    from serve.app import HistoryCache

    monkeypatch.setattr("ml.settings.load_settings", lambda **kw: settings)
    for m in range(7):
        add(settings, store, to=str(m), minutes=m)
    cache = HistoryCache(store=store, ttl_s=30)
    first = asyncio.run(cache.get(MODEL))
    assert [e["to_version"] for e in first] == ["6", "5", "4", "3", "2"]  # newest first, 5 of them
    add(settings, store, to="7", minutes=7)
    assert asyncio.run(cache.get(MODEL)) == first  # cached

    down = FailingStore()
    cache = HistoryCache(store=down, ttl_s=30)
    serve_log = logging.getLogger("ray.serve")  # Ray's logger does not propagate to the root
    serve_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            assert asyncio.run(cache.get(MODEL)) is None
            assert asyncio.run(cache.get(MODEL)) is None
    finally:
        serve_log.removeHandler(caplog.handler)
    assert down.calls == 1, "an S3 failure is retried before the cache expires"
    assert "serving history of agnews-classifier unavailable" in caplog.text

    slow = MemoryStore()
    slow.hook = lambda op, key: time.sleep(1.5)

    async def timed() -> tuple[list | None, float]:  # the request's wait (the thread ends later)
        started = time.monotonic()
        return await HistoryCache(store=slow, wait_s=0.5).get(MODEL), time.monotonic() - started

    entries, waited = asyncio.run(timed())
    assert entries is None and waited < 1.0, waited
