"""The serving history: who made a model's Serve application serve what, when, and how it went.

Every change of what a model serves is one entry: a deploy (``continuous_training``), the
automatic rollback after a failed deploy or smoke test, and the operator's ``rollback``, ``pin``
and ``promote`` (``serving_control`` DAG, ``python -m ml.serving_control``), failed attempts
included. An entry (:class:`HistoryEntry`) holds::

    model, dataset, action, from_version, to_version, result, at, actor, reason, seconds, detail, id

``action`` is ``deploy`` | ``auto_rollback`` | ``rollback`` | ``pin`` | ``promote`` (what serves
changed), or a stage of a staged rollout (``shadow_start`` | ``shadow_reject`` | ``canary_start`` |
``canary_rollback`` | ``canary_pass``: a candidate beside the serving model; from_version is the
serving model, to_version the candidate, and what serves does not change); ``result`` is
``ok`` (``to_version`` serves afterwards) | ``failed`` (nothing changed, or the rollback failed too)
| ``rolled_back`` (``to_version`` failed and ``from_version`` was put back); ``at`` is UTC ISO time;
``actor`` the DAG run id or ``user:<name>``; ``seconds`` how long the change took; ``detail`` a
short error text (or null); ``id`` a random hex id, unique per entry.

Storage, in the data bucket (S3 has no append, and several writers may record at once)::

    reports/serving/<model>/entries/<UTC yyyymmddThhmmssffffffZ>-<id>.json   one immutable object per entry
    reports/serving/<model>/history.jsonl                                   every entry, oldest first

:func:`record` first writes its entry as its own object, then rebuilds ``history.jsonl`` from the
previous ``history.jsonl`` plus the entry objects it does not hold yet, then lists the entries
again and rebuilds once more if a concurrent writer's entry appeared: the entry objects are the
record, ``history.jsonl`` a convenience that nothing depends on being current. :func:`read` reads
``history.jsonl`` and adds any entry object it lacks (all of them when it is missing or
unreadable), so a reader never misses an entry either.

Each entry is also mirrored onto the MLflow model versions as tags (``serving.<action>.<time>``,
see :func:`mirror_to_mlflow`); a tagging failure is logged and never fails the recording.

Model names become key segments: only ``[A-Za-z0-9._-]`` (first character alphanumeric, no
``..``, at most 200 characters) is accepted (:func:`check_model_name`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ml.settings import Settings
from ml.storage import REPORTS

if TYPE_CHECKING:
    from ml.storage import ObjectStore

log = logging.getLogger(__name__)

# Changes of what answers clients (100 % of the traffic).
SERVING_ACTIONS = ("deploy", "auto_rollback", "rollback", "pin", "promote")
# Stages of a staged rollout (ml.staged_rollout): a candidate beside the serving model. They never
# change what serves: from_version is the serving model, to_version the candidate.
STAGE_ACTIONS = ("shadow_start", "shadow_reject", "canary_start", "canary_rollback", "canary_pass")
ACTIONS = SERVING_ACTIONS + STAGE_ACTIONS
RESULTS = ("ok", "failed", "rolled_back")
HISTORY_PREFIX = f"{REPORTS}/serving"
HISTORY_FILE = "history.jsonl"
ENTRIES = "entries"
PAGE_PATH = "/ct/serving"  # where the ct_reports plugin shows the history (plugins/ct_reports_plugin.py)
MAX_REASON_CHARS = 2000
MAX_DETAIL_CHARS = 1000
MAX_TAG_VALUE_CHARS = 250  # MLflow's older registry limit; newer servers allow more
REBUILD_ATTEMPTS = 5

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ENTRY_KEY = re.compile(r"/(?P<stamp>\d{8}T\d{12}Z)-(?P<id>[0-9a-f]{32})\.json$")


def check_model_name(model: str) -> str:
    """``model`` if it is safe as one key segment (``[A-Za-z0-9._-]``, no ``..``); else ValueError."""
    if not isinstance(model, str) or not _MODEL_NAME.match(model) or ".." in model:
        raise ValueError(
            f"model name {model!r} is not safe as a storage key segment: use letters, digits, '.', '_' "
            "and '-' (first character a letter or digit, no '..', at most 200 characters)"
        )
    return model


def _one_line(text: str, limit: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class HistoryEntry(BaseModel):
    """One change (or attempted change) of what a model's Serve application serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Registered model name (MLflow).")
    dataset: str = Field(min_length=1, max_length=200)
    action: Literal[
        "deploy",
        "auto_rollback",
        "rollback",
        "pin",
        "promote",
        "shadow_start",
        "shadow_reject",
        "canary_start",
        "canary_rollback",
        "canary_pass",
    ]
    from_version: str | None = Field(None, description="What served before (None: nothing, or unknown).")
    to_version: str | None = Field(None, description="What the action meant to serve (None: never resolved).")
    result: Literal["ok", "failed", "rolled_back"]
    at: datetime = Field(default_factory=lambda: datetime.now(UTC), description="When it ended (UTC).")
    actor: str = Field(min_length=1, max_length=300, description="DAG run id, user:<name>, or a CLI.")
    reason: str = Field("", max_length=MAX_REASON_CHARS)
    seconds: float | None = Field(None, ge=0)
    detail: str | None = Field(None, description=f"Short error text, cut to {MAX_DETAIL_CHARS} characters.")
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$")

    @field_validator("model")
    @classmethod
    def _safe_model(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("from_version", "to_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"a version is a number or a string, got {type(value).__name__}")
        value = str(value).strip()
        if len(value) > 64:
            raise ValueError("a version is at most 64 characters")
        return value

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("at must be timezone-aware (UTC)")
        return value.astimezone(UTC)

    @field_validator("detail", mode="before")
    @classmethod
    def _short_detail(cls, value: Any) -> str | None:
        if value is None:
            return None
        text = str(value).strip()
        if len(text) > MAX_DETAIL_CHARS:
            text = text[: MAX_DETAIL_CHARS - 1] + "…"
        return text or None

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump()
        data["at"] = self.at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        return data

    @property
    def stamp(self) -> str:
        """Compact UTC time, e.g. ``20260301T104502123456Z`` (sorts like ``at``)."""
        return self.at.strftime("%Y%m%dT%H%M%S%fZ")


# ---- keys and links -----------------------------------------------------------------------------


def history_key(model: str) -> str:
    return f"{HISTORY_PREFIX}/{check_model_name(model)}/{HISTORY_FILE}"


def entries_prefix(model: str) -> str:
    return f"{HISTORY_PREFIX}/{check_model_name(model)}/{ENTRIES}/"


def entry_key(entry: HistoryEntry) -> str:
    return f"{entries_prefix(entry.model)}{entry.stamp}-{entry.id}.json"


def history_page_path(model: str | None = None) -> str:
    """The history page's path on the Airflow api-server (``/ct/serving/<model>``; the index for None)."""
    return f"{PAGE_PATH}/" if model is None else f"{PAGE_PATH}/{quote(check_model_name(model))}"


def serving_history_url(settings: Settings, model: str | None = None) -> str:
    """A browser link to a model's history page (the index for None), for DAG docs and task links.

    The page is served by the ``ct_reports`` plugin beside the report viewer: with
    ``CT_REPORT_VIEWER_URL=http://host:8080/ct/reports`` it is ``http://host:8080/ct/serving/<model>``.
    With no report viewer, the S3 URL of ``history.jsonl`` (of the ``reports/serving/`` folder for None).
    """
    viewer = settings.report_viewer_url.rstrip("/")
    if viewer:
        base = viewer.rsplit("/", 1)[0] if "/" in viewer.split("://", 1)[-1] else viewer
        return base + history_page_path(model).removeprefix("/ct")
    return settings.report_link(history_key(model) if model else f"{HISTORY_PREFIX}/")


# ---- writing ------------------------------------------------------------------------------------


def record(
    settings: Settings,
    *,
    model: str,
    dataset: str,
    action: str,
    from_version: str | int | None,
    to_version: str | int | None,
    result: str,
    actor: str,
    reason: str = "",
    seconds: float | None = None,
    detail: str | None = None,
    at: datetime | None = None,
    store: ObjectStore | None = None,
    mlflow: bool = True,
) -> dict[str, Any]:
    """Append one entry to ``model``'s serving history and return it (as :meth:`HistoryEntry.to_dict`).

    Raises ``pydantic.ValidationError`` for an invalid entry (unknown action or result, an unsafe
    model name, ...) before anything is written, and the store's error if the entry object cannot be
    written. A failure to rebuild ``history.jsonl`` afterwards or to tag the MLflow versions is
    logged only: the entry object is already the record.
    """
    from ml.storage import ObjectStore

    fields = {
        "model": model,
        "dataset": dataset,
        "action": action,
        "from_version": from_version,
        "to_version": to_version,
        "result": result,
        "actor": actor,
        "reason": reason,
        "seconds": seconds,
        "detail": detail,
    }
    if at is not None:
        fields["at"] = at
    entry = HistoryEntry(**fields)
    store = store or ObjectStore(settings)
    store.put_bytes(
        entry_key(entry), json.dumps(entry.to_dict(), sort_keys=True).encode(), "application/json"
    )
    try:
        rebuild(store, entry.model)
    except Exception as err:  # the entry object is written; readers merge it in
        log.warning("serving history of %s: history.jsonl not rebuilt (%s); the entry is stored", model, err)
    if mlflow:
        mirror_to_mlflow(settings, entry)
    log.info(
        "serving history %s: %s %s v%s -> v%s by %s: %s",
        entry.model,
        entry.action,
        entry.result,
        entry.from_version or "-",
        entry.to_version or "-",
        entry.actor,
        _one_line(entry.reason, 200),
    )
    return entry.to_dict()


def rebuild(store: ObjectStore, model: str) -> list[dict[str, Any]]:
    """Write ``history.jsonl`` with every entry object, again while new ones keep appearing."""
    for _ in range(REBUILD_ATTEMPTS):
        entries = _merged(store, model)
        written = {e["id"] for e in entries}
        body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
        store.put_bytes(history_key(model), body, "application/x-ndjson")
        # A writer that listed before another's entry existed wrote a history without it; whoever
        # wrote that entry lists afterwards, sees the older file is missing nothing of its own but
        # may have overwritten a newer one: list again and repeat until nothing is missing.
        if set(_entry_ids(store, model)) <= written:
            return entries
    log.warning("serving history of %s: entries kept arriving; history.jsonl may lag (readers merge)", model)
    return entries


# ---- reading ------------------------------------------------------------------------------------


def _entry_ids(store: ObjectStore, model: str) -> dict[str, str]:
    """{entry id: key} of every entry object of ``model``."""
    ids = {}
    for obj in store.list(entries_prefix(model)):
        match = _ENTRY_KEY.search(obj.key)
        if match:
            ids[match["id"]] = obj.key
    return ids


def _sort_key(entry: dict[str, Any]) -> tuple[str, str]:
    return (HistoryEntry.model_validate(entry).stamp, entry["id"])


def _merged(store: ObjectStore, model: str) -> list[dict[str, Any]]:
    """``history.jsonl`` plus every entry object it lacks, oldest first; invalid lines are skipped."""
    by_id: dict[str, dict[str, Any]] = {}
    key = history_key(model)
    try:
        text = store.get_bytes(key).decode()
    except Exception as err:  # missing (first entry) or unreadable: the entry objects are the record
        if getattr(err, "code", None) not in {"NoSuchKey", "NoSuchObject"} and not isinstance(err, KeyError):
            log.warning("serving history of %s: %s unreadable (%s); reading the entries", model, key, err)
        text = ""
    for line in text.splitlines():
        if line.strip():
            _add(by_id, line, f"{key} line")
    for entry_id, entry_object in _entry_ids(store, model).items():
        if entry_id not in by_id:
            _add(by_id, store.get_bytes(entry_object), entry_object)
    return sorted(by_id.values(), key=_sort_key)


def _add(by_id: dict[str, dict[str, Any]], raw: str | bytes, where: str) -> None:
    try:
        entry = HistoryEntry.model_validate(json.loads(raw)).to_dict()
    except Exception as err:
        log.warning("serving history: skipping an invalid entry in %s: %s", where, err)
        return
    by_id[entry["id"]] = entry


def read(
    settings: Settings,
    model: str,
    limit: int | None = None,
    store: ObjectStore | None = None,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """``model``'s entries, **oldest first** (``newest_first=True``: newest first); ``limit`` keeps
    the newest ``limit`` entries. An empty list when the model has no history."""
    from ml.storage import ObjectStore

    check_model_name(model)
    entries = _merged(store or ObjectStore(settings), model)
    if limit is not None:
        entries = entries[-limit:] if limit > 0 else []
    return entries[::-1] if newest_first else entries


def models_with_history(settings: Settings, store: ObjectStore | None = None) -> list[str]:
    """The models that have a serving history, sorted."""
    from ml.storage import ObjectStore

    store = store or ObjectStore(settings)
    names = []
    for folder in store.subfolders(f"{HISTORY_PREFIX}/"):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        try:
            names.append(check_model_name(name))
        except ValueError:
            continue
    return sorted(names)


def last_serving_change(
    settings: Settings, model: str, store: ObjectStore | None = None, entries: list[dict] | None = None
) -> dict[str, Any] | None:
    """The newest successful entry that says what serves (``result`` ok and a ``to_version``), or None."""
    entries = read(settings, model, store=store) if entries is None else entries
    return next((e for e in reversed(entries) if e["result"] == "ok" and e["to_version"]), None)


def previous_serving_version(
    settings: Settings,
    model: str,
    current: str | int | None = None,
    store: ObjectStore | None = None,
    entries: list[dict] | None = None,
) -> str | None:
    """The version that served before the current one, by the history; None if it records none.

    ``current`` is what serves now (e.g. from ``GET /v1/model``); by default the ``to_version`` of
    the last successful entry. The answer is the ``to_version`` of the last successful entry
    before the current one whose ``to_version`` differs from the current (so after a rollback from
    v7 to v5, the previous version is v7 again).
    """
    entries = read(settings, model, store=store) if entries is None else entries
    served = [
        e for e in entries if e["result"] == "ok" and e["to_version"] and e["action"] in SERVING_ACTIONS
    ]
    if current is None:
        if not served:
            return None
        current = served[-1]["to_version"]
    current = str(current)
    # the last entry that made `current` serve; entries after it (if any) are ignored
    last_current = max((i for i, e in enumerate(served) if e["to_version"] == current), default=len(served))
    for entry in reversed(served[:last_current]):
        if entry["to_version"] != current:
            return entry["to_version"]
    return None


# ---- MLflow -------------------------------------------------------------------------------------


def tag_key(entry: HistoryEntry | dict[str, Any]) -> str:
    """``serving.<action>.<compact UTC time>``: the MLflow tag of an entry on its versions."""
    entry = entry if isinstance(entry, HistoryEntry) else HistoryEntry.model_validate(entry)
    return f"serving.{entry.action}.{entry.stamp}"


def tag_value(entry: HistoryEntry | dict[str, Any], side: str = "to") -> str:
    """One line: result, from→to, actor, reason (cut to fit MLflow's tag value limit)."""
    entry = entry if isinstance(entry, HistoryEntry) else HistoryEntry.model_validate(entry)
    what = f"{entry.result}: v{entry.from_version or '-'} -> v{entry.to_version or '-'}"
    if side == "from":
        what += " (this version was replaced)" if entry.result == "ok" else " (this version kept serving)"
    text = f"{what}; by {_one_line(entry.actor, 80)}; {_one_line(entry.reason, 200)}"
    if entry.detail:
        text += f"; {_one_line(entry.detail, 200)}"
    return _one_line(text, MAX_TAG_VALUE_CHARS)


def mirror_to_mlflow(settings: Settings, entry: HistoryEntry | dict[str, Any]) -> list[str]:
    """Tag the entry onto its ``to_version`` and, when it is another version, its ``from_version``.

    Returns the versions tagged. Never raises: a failure is logged (the S3 entry is the record).
    """
    try:
        from mlflow import MlflowClient

        entry = entry if isinstance(entry, HistoryEntry) else HistoryEntry.model_validate(entry)
        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        tagged = []
        sides = [("to", entry.to_version)]
        if entry.from_version and entry.from_version != entry.to_version:
            sides.append(("from", entry.from_version))
        for side, version in sides:
            if not version or not version.isdigit():
                continue
            try:
                client.set_model_version_tag(entry.model, version, tag_key(entry), tag_value(entry, side))
                tagged.append(version)
            except Exception as err:
                log.warning("serving history: could not tag %s v%s in MLflow: %s", entry.model, version, err)
        return tagged
    except Exception as err:
        log.warning("serving history: MLflow mirroring failed: %s", err)
        return []
