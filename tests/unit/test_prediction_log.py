"""PredictionLogger without services: buffer bounds, partitions and keys, schema, retries, shutdown,
and the store-down path against a real minio client pointed at a closed port."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml.prediction_log import SCHEMA, PredictionLogger, fail_fast_store, read_predictions
from ml.settings import Settings
from ml.storage import ObjectInfo, ObjectStore

T0 = datetime(2025, 3, 1, 10, 59, 58, tzinfo=UTC)
KEY = re.compile(
    r"^predictions/dt=(?P<dt>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/"
    r"(?P<writer>[A-Za-z0-9._-]+)-(?P<stamp>\d{8}T\d{12})-(?P<seq>\d{6})\.parquet$"
)


class MemoryStore:
    """The parts of ObjectStore the logger and reader use, in memory, with a switch to fail writes."""

    bucket = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.listed: list[str] = []
        self.down = False
        self.lose_replies = False  # store the object, then fail as if the answer was lost

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> str:
        self.puts.append(key)
        if self.down:
            raise ConnectionRefusedError("store is down")
        self.objects[key] = data
        if self.lose_replies:
            raise TimeoutError("reply lost")
        return "etag"

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.listed.append(prefix)
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key, "etag", len(self.objects[key]), None)

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def table(self, key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.objects[key]))


def record(i: int, ts: datetime = T0, **extra) -> dict:
    return {
        "ts": ts,
        "request_id": f"req-{i // 2}",
        "text": f"text {i}",
        "label": "Sports" if i % 2 else "World",
        "score": 0.5 + i / 1000,
        "scores": {"Sports": 0.25, "World": 0.75},
        "model_name": "agnews-classifier",
        "model_version": "3",
        **extra,
    }


def closed_port() -> int:
    """A localhost port nobody listens on: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float = 5.0) -> None:
    async def poll() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.01)

    return poll()


def test_flush_groups_rows_by_their_own_hour_and_names_keys_by_layout():
    store = MemoryStore()
    logger = PredictionLogger(store, writer_id="SERVE_REPLICA::app#Classifier#ab12")
    times = [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=3), T0 + timedelta(days=1)]
    assert logger.append([record(i, ts) for i, ts in enumerate(times)]) == 4

    assert logger.flush_now() == 4

    keys = sorted(store.objects)
    parts = [KEY.match(key) for key in keys]
    assert all(parts), keys
    assert [(m["dt"], m["hour"]) for m in parts] == [
        ("2025-03-01", "10"),
        ("2025-03-01", "11"),
        ("2025-03-02", "10"),
    ]
    assert {m["writer"] for m in parts} == {"SERVE_REPLICA-app-Classifier-ab12"}
    assert len({m["stamp"] for m in parts}) == 1  # one flush, one stamp
    assert sorted(m["seq"] for m in parts) == ["000001", "000002", "000003"]
    for key, m in zip(keys, parts, strict=True):
        for ts in store.table(key)["ts"].to_pylist():
            assert (f"{ts:%Y-%m-%d}", f"{ts:%H}") == (m["dt"], m["hour"])
    assert logger.stats == {
        "buffered": 0,
        "written_rows": 4,
        "written_files": 3,
        "dropped_rows": 0,
        "failed_flushes": 0,
        "last_error": None,
    }

    logger.append([record(9)])
    logger.flush_now()
    assert KEY.match(max(store.objects, key=lambda k: KEY.match(k)["seq"]))["seq"] == "000004"


def test_one_clients_unencodable_text_costs_no_other_row():
    """Rows of many requests share a file; a lone surrogate once made the whole file fail to encode."""
    store = MemoryStore()
    logger = PredictionLogger(store, writer_id="w1")
    poisoned = record(1, text="bad \ud800 text", request_id="req-\udfff")
    assert logger.append([record(0), poisoned, record(2)]) == 3
    assert logger.flush_now() == 3
    (key,) = store.objects
    rows = store.table(key).to_pylist()
    assert [r["text"] for r in rows] == ["text 0", "bad \ufffd text", "text 2"]
    assert rows[1]["request_id"] == "req-\ufffd"
    assert logger.stats["dropped_rows"] == 0


def test_files_have_the_explicit_schema_even_when_optional_columns_are_empty():
    store = MemoryStore()
    logger = PredictionLogger(store, writer_id="w1")
    cet = timezone(timedelta(hours=1))
    logger.append(
        [
            {"ts": datetime(2025, 3, 1, 12, 30, tzinfo=cet), "text": "a", "label": "World", "score": 1},
            {"ts": datetime(2025, 3, 1, 11, 45), "text": "b", "label": "Sports", "score": 0.25},  # naive
        ]
    )
    logger.flush_now()

    (key,) = store.objects
    assert "/dt=2025-03-01/hour=11/" in key  # both are 11:xx UTC
    table = store.table(key)
    assert table.schema.equals(SCHEMA)
    assert table["ts"].to_pylist() == [
        datetime(2025, 3, 1, 11, 30, tzinfo=UTC),
        datetime(2025, 3, 1, 11, 45, tzinfo=UTC),
    ]
    assert table["scores"].to_pylist() == [None, None]
    assert table["request_id"].to_pylist() == [None, None]
    assert table["score"].to_pylist() == [1.0, 0.25]
    assert table["writer_id"].to_pylist() == ["w1", "w1"]


def test_scores_are_stored_as_json_and_read_back_in_the_window_only():
    store = MemoryStore()
    logger = PredictionLogger(store, writer_id="w1")
    logger.append([record(i, T0 + timedelta(minutes=i)) for i in range(5)])
    logger.flush_now()

    frame = read_predictions(store, T0 + timedelta(minutes=1), T0 + timedelta(minutes=3))

    assert list(frame.columns) == SCHEMA.names
    assert frame["text"].tolist() == ["text 1", "text 2"]
    assert json.loads(frame["scores"][0]) == {"Sports": 0.25, "World": 0.75}
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]"


def test_reader_lists_only_overlapping_partitions_and_whole_days_at_once():
    store = MemoryStore()
    start = datetime(2025, 3, 1, 21, 30, tzinfo=UTC)
    read_predictions(store, start, datetime(2025, 3, 3, 1, 0, tzinfo=UTC))
    assert store.listed == [
        "predictions/dt=2025-03-01/hour=21/",
        "predictions/dt=2025-03-01/hour=22/",
        "predictions/dt=2025-03-01/hour=23/",
        "predictions/dt=2025-03-02/",
        "predictions/dt=2025-03-03/hour=00/",
    ]


def test_reader_returns_a_typed_empty_frame_and_refuses_naive_bounds():
    frame = read_predictions(MemoryStore(), T0, T0 + timedelta(hours=2))
    assert frame.empty
    assert list(frame.columns) == SCHEMA.names
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]"
    assert str(frame["score"].dtype) == "float64"
    with pytest.raises(ValueError, match="naive"):
        read_predictions(MemoryStore(), T0.replace(tzinfo=None), T0)


def test_buffer_is_bounded_and_drops_are_counted():
    dropped: list[int] = []
    logger = PredictionLogger(
        MemoryStore(), writer_id="w1", flush_rows=5, max_buffer_rows=10, on_dropped=dropped.append
    )
    assert logger.append([record(i) for i in range(7)]) == 7
    assert logger.append([record(i) for i in range(7)]) == 3
    assert logger.append([record(0)]) == 0

    assert dropped == [4, 1]
    assert logger.stats["buffered"] == 10
    assert logger.stats["dropped_rows"] == 5


def test_invalid_records_are_dropped_and_append_never_raises():
    dropped: list[int] = []
    logger = PredictionLogger(MemoryStore(), writer_id="w1", on_dropped=dropped.append)
    accepted = logger.append(
        [record(0, score="not a number"), "not a mapping", record(1, ts="yesterday"), record(2)]
    )
    assert accepted == 1
    assert dropped == [3]
    assert logger.append(None) == 0  # not even a sequence


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="writer_id"):
        PredictionLogger(MemoryStore(), writer_id="::")
    with pytest.raises(ValueError, match="max_buffer_rows"):
        PredictionLogger(MemoryStore(), writer_id="w", max_buffer_rows=0)
    with pytest.raises(ValueError, match="flush_interval_s"):
        PredictionLogger(MemoryStore(), writer_id="w", flush_interval_s=0)


def test_failed_write_keeps_rows_and_retries_under_the_same_key():
    store = MemoryStore()
    store.down = True
    written: list[int] = []
    logger = PredictionLogger(store, writer_id="w1", on_written=written.append)
    logger.append([record(i) for i in range(3)])

    assert logger.flush_now() == 0
    assert logger.flush_now() == 0
    assert logger.stats["buffered"] == 3
    assert logger.stats["failed_flushes"] == 2
    assert "store is down" in logger.stats["last_error"]

    store.down = False
    logger.append([record(3)])
    assert logger.flush_now() == 4
    assert len(set(store.puts)) == 2  # the failed batch was retried under its key, then the new row
    assert store.puts[0] == store.puts[1] == store.puts[2]
    assert written == [4]
    assert logger.stats["last_error"] is None


def test_a_write_that_landed_but_lost_its_reply_is_not_duplicated():
    store = MemoryStore()
    logger = PredictionLogger(store, writer_id="w1")
    logger.append([record(i) for i in range(3)])
    store.lose_replies = True
    assert logger.flush_now() == 0
    store.lose_replies = False
    assert logger.flush_now() == 3

    assert len(store.objects) == 1
    assert len(read_predictions(store, T0, T0 + timedelta(hours=1))) == 3


def test_callback_errors_do_not_break_flushing():
    def broken(_: int) -> None:
        raise RuntimeError("metrics backend gone")

    store = MemoryStore()
    logger = PredictionLogger(store, writer_id="w1", on_written=broken, on_dropped=broken, max_buffer_rows=1)
    assert logger.append([record(0), record(1)]) == 1
    assert logger.flush_now() == 1
    assert len(store.objects) == 1


def test_flusher_writes_on_interval_and_early_at_flush_rows():
    async def main() -> None:
        store = MemoryStore()
        slow = PredictionLogger(store, writer_id="slow", flush_interval_s=60, flush_rows=5)
        fast = PredictionLogger(store, writer_id="fast", flush_interval_s=0.05)
        slow.start()
        slow.start()  # idempotent
        fast.start()
        fast.append([record(0)])
        slow.append([record(i) for i in range(4)])
        await wait_for(lambda: fast.stats["written_rows"] == 1)
        assert slow.stats["written_rows"] == 0  # below flush_rows, long before the interval
        slow.append([record(4)])
        await wait_for(lambda: slow.stats["written_rows"] == 5)
        await asyncio.gather(slow.close(), fast.close())

    asyncio.run(main())


def test_flusher_waits_an_interval_after_a_failure_however_full_the_buffer():
    async def main() -> None:
        store = MemoryStore()
        store.down = True
        logger = PredictionLogger(store, writer_id="w1", flush_interval_s=0.3, flush_rows=1)
        logger.start()
        for i in range(50):
            logger.append([record(i)])  # each one asks for an early flush
            await asyncio.sleep(0.013)
        assert 1 <= len(store.puts) <= 4  # ~0.65 s: one try per interval, not one per append
        await logger.close(timeout_s=0.1)

    asyncio.run(main())


def test_close_flushes_once_is_idempotent_and_refuses_later_rows():
    store = MemoryStore()
    dropped: list[int] = []
    logger = PredictionLogger(store, writer_id="w1", flush_interval_s=60, on_dropped=dropped.append)

    async def main() -> None:
        logger.start()
        logger.append([record(i) for i in range(3)])
        await asyncio.gather(logger.close(), logger.close())
        await logger.close()

    asyncio.run(main())
    asyncio.run(logger.close())  # even from another loop
    assert len(store.puts) == 1
    assert logger.stats["written_rows"] == 3
    assert logger.append([record(9)]) == 0
    assert dropped == [1]
    with pytest.raises(RuntimeError, match="after close"):
        asyncio.run(_start(logger))


async def _start(logger: PredictionLogger) -> None:
    logger.start()


def test_close_without_start_still_flushes():
    store = MemoryStore()
    logger = PredictionLogger(store, writer_id="w1")
    logger.append([record(0)])
    asyncio.run(logger.close())
    assert logger.stats["written_rows"] == 1


def test_fail_fast_store_keeps_the_original_untouched():
    store = ObjectStore(Settings(s3_endpoint="127.0.0.1:1"), bucket="b")
    fast = fail_fast_store(store)
    assert fast.client is not store.client
    assert (fast.bucket, fast.settings) == (store.bucket, store.settings)
    assert fast.client._http.connection_pool_kw["timeout"].connect_timeout == 2.0
    assert store.client._http.connection_pool_kw["timeout"].connect_timeout == 300


def test_a_silent_endpoint_times_out_after_the_read_timeout():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = ObjectStore(Settings(s3_endpoint=f"127.0.0.1:{silent.getsockname()[1]}"))
        fast = fail_fast_store(store, read_timeout_s=0.3, retries=0)
        started = time.monotonic()
        with pytest.raises(Exception, match="timed out"):
            fast.put_bytes("k", b"x")
        assert time.monotonic() - started < 3.0


def test_store_down_fails_fast_keeps_rows_then_drops_over_capacity():
    """A real minio client on a closed port: minio's default client spends ~6 s retrying each write."""
    written: list[int] = []
    dropped: list[int] = []
    store = ObjectStore(Settings(s3_endpoint=f"127.0.0.1:{closed_port()}"))
    logger = PredictionLogger(
        store,
        writer_id="w1",
        flush_rows=5,
        max_buffer_rows=20,
        on_written=written.append,
        on_dropped=dropped.append,
    )
    assert logger.append([record(i) for i in range(15)]) == 15

    started = time.monotonic()
    assert logger.flush_now() == 0
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"a flush against a refused port took {elapsed:.1f} s"
    assert logger.flush_now() == 0

    stats = logger.stats
    assert stats["buffered"] == 15
    assert stats["failed_flushes"] == 2
    assert "refused" in stats["last_error"].lower()
    assert logger.append([record(i) for i in range(10)]) == 5
    assert dropped == [5]

    started = time.monotonic()
    asyncio.run(logger.close(timeout_s=0.5))
    assert time.monotonic() - started < 3.0
    assert dropped == [5, 20]  # the 20 rows it could not write by the deadline
    assert written == []
    assert logger.stats["buffered"] == 0
    assert logger.stats["dropped_rows"] == 25
