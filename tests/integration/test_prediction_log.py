"""PredictionLogger against the local S3 endpoint: a round trip across two hour partitions, and
rows appended during an outage (a proxy in front of S3 switched off) written once it is back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest

from ml.prediction_log import PredictionLogger, read_predictions
from ml.settings import Settings
from ml.storage import ObjectStore

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 10, 58, tzinfo=UTC)


def records(n: int, start: datetime, step: timedelta, model_version: str = "7") -> list[dict]:
    return [
        {
            "ts": start + i * step,
            "request_id": f"req-{i}",
            "text": f"text number {i}",
            "label": ("World", "Sports")[i % 2],
            "score": round(0.5 + i / (2 * n), 6),
            "scores": {"World": 0.5, "Sports": 0.5} if i % 3 == 0 else None,
            "model_name": "agnews-classifier",
            "model_version": model_version,
        }
        for i in range(n)
    ]


async def until(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_rows_round_trip_through_s3_across_an_hour_boundary(store, settings):
    prefix = f"it/{settings.dataset}/predictions"
    rows = records(240, T0, timedelta(seconds=1))  # 10:58:00 .. 11:01:59
    written: list[int] = []

    async def main() -> None:
        logger = PredictionLogger(
            store, writer_id="replica-a", prefix=prefix, flush_interval_s=0.1, on_written=written.append
        )
        logger.start()
        for i in range(0, len(rows), 40):  # as requests would: a few rows at a time
            assert logger.append(rows[i : i + 40]) == 40
            await asyncio.sleep(0.02)
        await logger.close()
        assert logger.stats["written_rows"] == 240
        assert logger.stats["dropped_rows"] == 0

    asyncio.run(main())

    assert sum(written) == 240
    keys = [obj.key for obj in store.list(prefix)]
    assert {key.rsplit("/", 1)[0] for key in keys} == {
        f"{prefix}/dt=2025-03-01/hour=10",
        f"{prefix}/dt=2025-03-01/hour=11",
    }
    frame = read_predictions(store, T0 - timedelta(hours=1), T0 + timedelta(hours=2), prefix=prefix)
    assert len(frame) == 240
    assert frame["ts"].is_monotonic_increasing
    assert frame["text"].tolist() == [r["text"] for r in rows]
    assert frame["score"].tolist() == [r["score"] for r in rows]
    assert set(frame["writer_id"]) == {"replica-a"}
    assert frame["scores"].isna().sum() == sum(r["scores"] is None for r in rows)

    hour_11 = read_predictions(store, T0 + timedelta(minutes=2), T0 + timedelta(hours=1), prefix=prefix)
    assert len(hour_11) == 120
    assert hour_11["ts"].min() == datetime(2025, 3, 1, 11, 0, tzinfo=UTC)


class S3Proxy:
    """A TCP relay to the S3 endpoint that can be switched off (refusing connections) and on."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def on(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def off(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:  # pooled keep-alive connections go too
                writer.close()
            self.writers.clear()
            await self.server.wait_closed()
            self.server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


def test_rows_appended_while_s3_is_unreachable_are_written_when_it_returns(store, settings):
    prefix = f"it/{settings.dataset}/predictions"
    proxy = S3Proxy(settings.s3_endpoint)
    via_proxy = ObjectStore(Settings(s3_endpoint=f"127.0.0.1:{proxy.port}", dataset=settings.dataset))
    now = datetime.now(UTC).replace(microsecond=0)
    rows = records(30, now, timedelta(milliseconds=10))

    async def main() -> None:
        logger = PredictionLogger(via_proxy, writer_id="replica-b", prefix=prefix, flush_interval_s=0.2)
        logger.start()
        await proxy.on()
        assert logger.append(rows[:10]) == 10
        await until(lambda: logger.stats["written_rows"] == 10)

        await proxy.off()
        assert logger.append(rows[10:]) == 20
        await until(lambda: logger.stats["failed_flushes"] >= 2)
        assert logger.stats["buffered"] == 20
        assert logger.stats["written_rows"] == 10

        await proxy.on()
        await until(lambda: logger.stats["written_rows"] == 30)
        assert logger.stats["last_error"] is None
        await logger.close()
        await proxy.off()
        assert logger.stats["dropped_rows"] == 0

    asyncio.run(main())

    frame = read_predictions(store, now, now + timedelta(minutes=1), prefix=prefix)
    assert frame["request_id"].tolist() == [r["request_id"] for r in rows]  # each row once, in order
