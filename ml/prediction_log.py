"""Prediction logging for a Ray Serve replica: every served text, appended to S3 as Parquet.

Layout in ``Settings.data_bucket`` (one object per flush and hour)::

    predictions/dt=YYYY-MM-DD/hour=HH/<writer_id>-<YYYYmmddTHHMMSSffffff>-<seq:06d>.parquet

``dt``/``hour`` are the UTC date and hour of the rows' own ``ts`` (a flush that spans an hour
boundary writes one object into each partition); the timestamp in the name is when the batch was
cut, ``seq`` counts the writer's batches. Every file has the schema :data:`SCHEMA`: one row per text
with ``ts``, ``request_id``, ``text``, ``label``, ``score``, ``scores`` (JSON of every class's
probability, or null), ``model_name``, ``model_version``, ``model_run_id`` (the MLflow run that
trained it: a version number alone can be reused), ``item`` (the text's index in its request),
``role`` (``champion``; ``shadow`` for a candidate's answer to a mirrored copy that no client saw;
``canary`` for a candidate's answer a client got), ``latency_ms`` (the request's inference time in
the replica), ``error`` (set, with ``label`` null, when that model failed on the text: a canary's
client was then answered by the champion) and ``writer_id``. Files written before a column existed
read back with it null (``role`` null = ``champion``). Only rows with a ``role`` other than
``shadow`` and no ``error`` are answers a client received (:func:`client_rows`).
:func:`read_predictions` reads a time window back (for the drift check).

Guarantees of :class:`PredictionLogger`:

* A request never waits on S3 and never fails because of logging: :meth:`~PredictionLogger.append`
  only normalizes the rows into an in-memory buffer; Parquet encoding and uploads run in a worker
  thread (``asyncio.to_thread``) every ``flush_interval_s``, or sooner once ``flush_rows`` are waiting.
* Memory is bounded: rows buffered, waiting for a retry or being uploaded never exceed
  ``max_buffer_rows``. Rows beyond that are dropped and counted (``stats["dropped_rows"]``,
  ``on_dropped``), with at most one warning a minute.
* A failed upload (store down) keeps its rows and retries them under the same key at the next
  interval, so an upload that did land but whose answer was lost is overwritten, not duplicated.
  The uploads use a client with short timeouts and one retry (:func:`fail_fast_store`): against a
  refused port a flush fails in milliseconds instead of minio's default ~6 s of backoff; an
  unreachable host costs 2 × 2 s (connect) and one that accepts but never answers 2 × 10 s (read),
  instead of minio's 5-minute timeouts retried 5 times. Meanwhile requests go on filling the buffer.
* :meth:`~PredictionLogger.close` flushes what is left, trying until its timeout; rows it cannot
  write by then are counted as dropped. So while the process lives and the buffer has room, every
  row is written once; a crash loses what was in memory (an interval's rows, or an outage's worth).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import certifi
import pandas as pd  # imported up front: pyarrow loads it on the first tz-aware array (~1 s)
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import urllib3

from ml.storage import ObjectStore, minio_client

log = logging.getLogger(__name__)

# Requests the pipeline itself sends (deploy smoke tests) carry X-Request-ID with this prefix:
# they are logged like any other, and left out of drift windows (ml.rollout, ml.monitor).
PIPELINE_REQUEST_PREFIX = "ct-pipeline-"
PREDICTIONS = "predictions"

SCHEMA = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("request_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("scores", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("model_run_id", pa.string()),
        pa.field("item", pa.int32()),
        pa.field("role", pa.string()),
        pa.field("latency_ms", pa.float64()),
        pa.field("error", pa.string()),
        pa.field("writer_id", pa.string(), nullable=False),
    ]
)
RECORD_FIELDS = tuple(SCHEMA.names[:-1])  # what a caller passes; writer_id is the logger's

WARN_EVERY_S = 60.0
CLOSE_RETRY_PAUSE_S = 0.5
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SURROGATES = re.compile("[\ud800-\udfff]")

Row = tuple[Any, ...]  # values in RECORD_FIELDS order, normalized


def fail_fast_store(
    store: ObjectStore,
    *,
    connect_timeout_s: float = 2.0,
    read_timeout_s: float = 10.0,
    retries: int = 1,
) -> ObjectStore:
    """A copy of ``store`` whose client gives up quickly when the endpoint is down.

    minio's own client waits up to 5 minutes to connect or read and retries 5 times with backoff:
    right for a batch task, wrong for a logger that must notice an outage and keep buffering.
    The copy has the same endpoint, credentials, region and bucket; ``store`` is left untouched.
    """
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=4,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
    )
    fast = copy.copy(store)
    fast.client = minio_client(store.settings, http)  # shadows the cached_property on the copy only
    return fast


def partition_prefix(prefix: str, ts: datetime) -> str:
    """``<prefix>/dt=YYYY-MM-DD/hour=HH/`` for the UTC hour of ``ts``."""
    ts = ts.astimezone(UTC)
    return f"{prefix}/dt={ts:%Y-%m-%d}/hour={ts:%H}/"


@dataclass
class _Batch:
    """Rows of one hour partition, bound to the key they are (re)tried under."""

    key: str
    rows: list[Row]


class _Throttle:
    """Lets a message through at most once per ``every_s``; counts what it held back."""

    def __init__(self, every_s: float = WARN_EVERY_S) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class PredictionLogger:
    """Buffers prediction rows in memory and writes them to S3 in micro-batches (see module doc).

    ``append`` is called on the replica's event loop; ``start`` runs the flusher there. The
    callbacks run on whichever thread counts the rows (the flush thread for writes, the caller of
    ``append`` for a full buffer): keep them quick and thread-safe; their exceptions are logged.
    An :class:`~ml.storage.ObjectStore` is rebound to a :func:`fail_fast_store` copy; any other
    object with ``put_bytes(key, data, content_type)`` is used as given.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        writer_id: str,
        prefix: str = PREDICTIONS,
        flush_interval_s: float = 5.0,
        flush_rows: int = 512,
        max_buffer_rows: int = 10_000,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        if flush_rows < 1 or max_buffer_rows < 1:
            raise ValueError(
                f"flush_rows and max_buffer_rows must be >= 1, got {flush_rows} and {max_buffer_rows}"
            )
        writer = _UNSAFE_KEY_CHARS.sub("-", writer_id).strip("-.")
        if not writer:
            raise ValueError(f"writer_id {writer_id!r} has no characters usable in an S3 key")
        self.store = fail_fast_store(store) if isinstance(store, ObjectStore) else store
        self.writer_id = writer
        self.prefix = prefix.strip("/")
        self.flush_interval_s = flush_interval_s
        self.flush_rows = flush_rows
        self.max_buffer_rows = max_buffer_rows
        self.on_written = on_written
        self.on_dropped = on_dropped

        self._lock = threading.Lock()  # guards the buffers and counters below
        self._flush_lock = threading.Lock()  # one flush at a time: keys and order stay sane
        self._rows: list[Row] = []  # accepted, not yet cut into batches
        self._pending: deque[_Batch] = deque()  # cut, waiting for a (re)try
        self._inflight = 0  # rows of the batch being uploaded
        self._seq = 0
        self._written_rows = 0
        self._written_files = 0
        self._dropped_rows = 0
        self._failed_flushes = 0
        self._last_error: str | None = None
        self._abandoned = False  # close gave up: a batch that fails from now on is dropped
        self._drop_warning = _Throttle()
        self._fail_warning = _Throttle()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None

    # --- the request path -------------------------------------------------------------

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Buffer ``records`` (one per text); returns how many were accepted. Never blocks or raises."""
        try:
            return self._append(records)
        except Exception:  # the boundary: logging must never fail a request
            if self._drop_warning.ready():
                log.warning("prediction log: append failed; rows dropped", exc_info=True)
            return 0

    def _append(self, records: Sequence[Mapping[str, Any]]) -> int:
        rows: list[Row] = []
        invalid, invalid_error = 0, None
        for record in records:
            try:
                rows.append(_normalize(record))
            except Exception as err:  # a record we cannot store is dropped, not the request
                invalid += 1
                invalid_error = err
        if invalid and self._drop_warning.ready():
            log.warning("prediction log: %d invalid record(s) dropped: %s", invalid, invalid_error)
        with self._lock:
            room = 0 if self._closed else max(0, self.max_buffer_rows - self._held())
            accepted = rows[:room]
            self._rows.extend(accepted)
            full = len(rows) - len(accepted)
            dropped = invalid + full
            self._dropped_rows += dropped
            total_dropped = self._dropped_rows
            wake = len(self._rows) >= self.flush_rows
        if full:
            self._warn_dropped(full, total_dropped, "logger closed" if self._closed else "buffer full")
        if dropped:
            self._notify(self.on_dropped, dropped)
        if wake:
            self._wake_flusher()
        return len(accepted)

    def _held(self) -> int:
        return len(self._rows) + sum(len(b.rows) for b in self._pending) + self._inflight

    def _warn_dropped(self, n: int, total: int, why: str) -> None:
        if self._drop_warning.ready():
            held_back = self._drop_warning.take_suppressed()
            log.warning(
                "prediction log: %s, dropped %d row(s) (%d dropped in all; %d similar warning(s) "
                "suppressed); last error: %s",
                why,
                n,
                total,
                held_back,
                self._last_error,
            )

    def _wake_flusher(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    # --- the background flusher ---------------------------------------------------------

    def start(self) -> None:
        """Start the flush loop on the running event loop (idempotent)."""
        if self._closed:
            raise RuntimeError("prediction log: start() after close()")
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name=f"prediction-log-{self.writer_id}")

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            try:
                failures = self._failed_flushes
                await asyncio.to_thread(self.flush_now)
            except Exception:  # keep the loop alive whatever happens; flush_now records its own errors
                log.exception("prediction log: flush crashed")
                failures = -1
            if self._failed_flushes != failures:
                # The store is down: wait a whole interval, however full the buffer gets.
                await asyncio.sleep(self.flush_interval_s)

    def flush_now(self) -> int:
        """Write everything buffered, synchronously; returns rows written. Failed rows stay buffered."""
        with self._flush_lock:
            written = self._write_pending()
            if not self._pending:
                self._cut_batches()
                written += self._write_pending()
        if written:
            self._notify(self.on_written, written)
        return written

    def _cut_batches(self) -> None:
        """Move the buffered rows into one pending batch per hour partition, each with its key."""
        with self._lock:
            rows, self._rows = self._rows, []
            self._inflight = len(rows)  # still counted against the bound while grouped off the lock
        if not rows:
            return
        by_hour: dict[tuple[int, int, int, int], list[Row]] = {}
        for row in rows:
            ts = row[0]  # normalized to UTC by append
            by_hour.setdefault((ts.year, ts.month, ts.day, ts.hour), []).append(row)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        with self._lock:
            self._inflight = 0
            for hour in sorted(by_hour):
                self._seq += 1
                part = partition_prefix(self.prefix, by_hour[hour][0][0])
                self._pending.append(
                    _Batch(f"{part}{self.writer_id}-{stamp}-{self._seq:06d}.parquet", by_hour[hour])
                )

    def _write_pending(self) -> int:
        """Upload pending batches in order; stop at the first failure (the store is likely down)."""
        written = 0
        while True:
            with self._lock:
                if not self._pending:
                    return written
                batch = self._pending.popleft()
                self._inflight = len(batch.rows)
            try:
                body = self._encode(batch.rows)
            except Exception as err:  # rows that cannot be encoded never will be: give them up
                self._give_up(batch, err)
                continue
            try:
                self.store.put_bytes(batch.key, body, "application/vnd.apache.parquet")
            except Exception as err:  # store down, credentials, ...: keep the rows and retry later
                self._failed(batch, err)
                return written
            with self._lock:
                self._inflight = 0
                self._written_rows += len(batch.rows)
                self._written_files += 1
                recovered, self._last_error = self._last_error is not None, None
            if recovered:
                log.info("prediction log: writing to s3://%s again", getattr(self.store, "bucket", "?"))
            written += len(batch.rows)

    def _encode(self, rows: list[Row]) -> bytes:
        columns = list(zip(*rows, strict=True))
        data = {name: list(values) for name, values in zip(RECORD_FIELDS, columns, strict=True)}
        data["writer_id"] = [self.writer_id] * len(rows)
        table = pa.Table.from_pydict(data, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue()

    def _failed(self, batch: _Batch, err: Exception) -> None:
        message = f"{type(err).__name__}: {err}"
        with self._lock:
            self._inflight = 0
            self._failed_flushes += 1
            self._last_error = message
            abandoned = self._abandoned
            if not abandoned:
                self._pending.appendleft(batch)
            held = self._held()
        if abandoned:
            self._give_up(batch, err)
        elif self._fail_warning.ready():
            log.warning(
                "prediction log: writing %s failed (%s); %d row(s) kept for the next try "
                "(%d similar warning(s) suppressed)",
                batch.key,
                message,
                held,
                self._fail_warning.take_suppressed(),
            )

    def _give_up(self, batch: _Batch, err: Exception) -> None:
        with self._lock:
            self._inflight = 0
            self._dropped_rows += len(batch.rows)
            self._last_error = f"{type(err).__name__}: {err}"
        log.error("prediction log: gave up %d row(s) for %s: %s", len(batch.rows), batch.key, err)
        self._notify(self.on_dropped, len(batch.rows))

    @staticmethod
    def _notify(callback: Callable[[int], None] | None, n: int) -> None:
        if callback is None:
            return
        try:
            callback(n)
        except Exception:
            log.exception("prediction log: callback %r failed", callback)

    # --- shutdown and introspection --------------------------------------------------------

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the flush loop and write what is left, trying for up to ``timeout_s`` (idempotent).

        Rows still unwritten at the deadline are dropped and counted; appends after close are dropped.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close(timeout_s))
        await asyncio.shield(self._close_task)

    async def _close(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._has_work() and (left := deadline - time.monotonic()) > 0:
            failures = self._failed_flushes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(self.flush_now), left)
            if self._failed_flushes != failures:
                await asyncio.sleep(min(CLOSE_RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
        lost = self._abandon()
        if lost:
            log.warning(
                "prediction log: closed with %d row(s) unwritten after %.1f s (last error: %s)",
                lost,
                timeout_s,
                self._last_error,
            )
            self._notify(self.on_dropped, lost)

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._rows or self._pending or self._inflight)

    def _abandon(self) -> int:
        """Drop what is still buffered; an upload still running is dropped if it fails."""
        with self._lock:
            self._abandoned = True
            lost = len(self._rows) + sum(len(b.rows) for b in self._pending)
            self._rows, self._pending = [], deque()
            self._dropped_rows += lost
        return lost

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since creation; ``buffered`` counts rows held in memory, being written included."""
        with self._lock:
            return {
                "buffered": self._held(),
                "written_rows": self._written_rows,
                "written_files": self._written_files,
                "dropped_rows": self._dropped_rows,
                "failed_flushes": self._failed_flushes,
                "last_error": self._last_error,
            }


def _normalize(record: Mapping[str, Any]) -> Row:
    """One record as a tuple in RECORD_FIELDS order, with the schema's Python types."""
    ts = record.get("ts")
    if ts is None:
        ts = datetime.now(UTC)
    elif isinstance(ts, datetime):
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)  # naive = UTC
    elif isinstance(ts, int | float) and not isinstance(ts, bool):
        ts = datetime.fromtimestamp(ts, UTC)
    else:
        raise TypeError(f"ts must be a datetime or epoch seconds, got {type(ts).__name__}")
    score = record.get("score")
    scores = record.get("scores")
    if scores is not None and not isinstance(scores, str):
        scores = json.dumps(scores, sort_keys=True)
    return (
        ts,
        _text(record.get("request_id")),
        _text(record.get("text")),
        _text(record.get("label")),
        None if score is None else float(score),
        scores,
        _text(record.get("model_name")),
        _text(record.get("model_version")),
        _text(record.get("model_run_id")),
        None if record.get("item") is None else int(record["item"]),
        _text(record.get("role")),
        None if record.get("latency_ms") is None else float(record["latency_ms"]),
        _text(record.get("error")),
    )


def _text(value: Any) -> str | None:
    """``value`` as a string Parquet can store: lone surrogates (which JSON can carry) become U+FFFD.

    Rows of many requests share one file: one client's unencodable text must not cost the others
    their rows (the whole file would fail to encode and be given up).
    """
    if value is None:
        return None
    return _SURROGATES.sub("\ufffd", str(value))


# --- reading a window back (drift check) ------------------------------------------------------


def read_predictions(
    store: ObjectStore,
    start: datetime,
    end: datetime,
    prefix: str = PREDICTIONS,
    *,
    max_workers: int = 8,
) -> pd.DataFrame:
    """Every logged row with ``start <= ts < end``, sorted by ``ts``, as a DataFrame.

    Lists only the hour partitions that overlap the window (a day at a time where the window
    covers it whole) and downloads their files in parallel. ``start`` and ``end`` must be
    timezone-aware. With nothing logged, the frame is empty but has every column of :data:`SCHEMA`.
    """
    for name, value in (("start", start), ("end", end)):
        if value.tzinfo is None:
            raise ValueError(f"read_predictions: {name}={value} is naive; pass an aware datetime (UTC)")
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    keys = [
        obj.key
        for part in _window_prefixes(prefix.strip("/"), start, end)
        for obj in store.list(part)
        if obj.key.endswith(".parquet")
    ]
    if not keys:
        return SCHEMA.empty_table().to_pandas()
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(keys)))) as pool:
        tables = list(pool.map(lambda key: _read_file(store, key), keys))
    table = pa.concat_tables(tables, promote_options="default")
    ts = table["ts"]
    lo = pa.scalar(start, type=ts.type)
    hi = pa.scalar(end, type=ts.type)
    table = table.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))
    frame = table.sort_by([("ts", "ascending")]).to_pandas()
    return frame.reset_index(drop=True)


def client_rows(window: pd.DataFrame) -> pd.DataFrame:
    """The rows of answers clients received: no shadow answers (mirrored copies nobody saw) and no
    failed attempts (an erroring canary's client was answered by the champion, logged separately)."""
    role = window["role"] if "role" in window else pd.Series(None, index=window.index, dtype=object)
    error = window["error"] if "error" in window else pd.Series(None, index=window.index, dtype=object)
    return window[(role.fillna("champion") != "shadow") & error.isna()]


def _window_prefixes(prefix: str, start: datetime, end: datetime) -> Iterator[str]:
    """The partition prefixes overlapping [start, end): whole days where covered, else hours."""
    hour = start.replace(minute=0, second=0, microsecond=0)
    while hour < end:
        day_start = hour.replace(hour=0)
        day_end = day_start + timedelta(days=1)
        if hour == day_start and day_end <= end:
            yield f"{prefix}/dt={day_start:%Y-%m-%d}/"
            hour = day_end
        else:
            yield partition_prefix(prefix, hour)
            hour += timedelta(hours=1)


def _read_file(store: ObjectStore, key: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(store.get_bytes(key)))
    except pa.ArrowException as err:
        where = f"s3://{getattr(store, 'bucket', '?')}/{key}"
        raise ValueError(f"{where} is not a readable Parquet file") from err


def wait_for_logged(
    store: ObjectStore,
    since: datetime,
    model_name: str,
    count: int,
    timeout: float = 120,
    prefix: str = PREDICTIONS,
) -> int:
    """Wait until ``count`` rows answered by ``model_name`` since ``since`` are in the log (the
    replicas flush every few seconds); returns how many there are. TimeoutError names the shortfall."""
    deadline = time.monotonic() + timeout
    while True:
        window = read_predictions(store, since, datetime.now(UTC) + timedelta(minutes=1), prefix)
        logged = int((window["model_name"] == model_name).sum())
        if logged >= count:
            return logged
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {logged}/{count} predictions of {model_name} logged after {timeout:.0f} s"
            )
        time.sleep(2)
