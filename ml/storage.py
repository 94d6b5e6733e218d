"""S3 access (MinIO API) for the pipeline, and the bucket layout.

Layout of ``Settings.data_bucket``::

    raw/<dataset>/<batch id>/<file>          labelled batches as they arrive (CSV, JSONL, Parquet)
    snapshots/<snapshot id>/manifest.json    what a training run saw (keys, etags, sha256, rows)
    snapshots/<snapshot id>/data/<batch>.parquet   the parsed rows of each batch
    snapshots/<snapshot id>/validated.parquet      the rows that passed the data gate
    snapshots/<snapshot id>/validation.json        the gate's decision per batch
    quarantine/<dataset>/<batch id>/<file>   rejected batches, moved out of raw/ untouched
    quarantine/<dataset>/<batch id>/_validation/<snapshot id>.{json,html}  why they were rejected
    reports/validation/<snapshot id>/...     Great Expectations Data Docs for each gate run

Only the ``minio`` client is used, so the same code runs against MinIO and any S3 endpoint.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from minio import Minio
from minio.commonconfig import CopySource
from minio.error import S3Error

from ml.settings import Settings

log = logging.getLogger(__name__)

RAW = "raw"
SNAPSHOTS = "snapshots"
QUARANTINE = "quarantine"
REPORTS = "reports"


@dataclass(frozen=True)
class ObjectInfo:
    """The parts of an S3 listing the pipeline relies on."""

    key: str
    etag: str
    size: int
    last_modified: datetime | None


def minio_client(settings: Settings, http_client: Any = None) -> Minio:
    """A :class:`minio.Minio` for the configured endpoint; ``http_client`` (a urllib3 pool) sets
    timeouts and retries, e.g. to fail fast in health checks and the prediction logger."""
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=http_client,
    )


class ObjectStore:
    """A small façade over :class:`minio.Minio` bound to one bucket; connects lazily."""

    def __init__(self, settings: Settings, bucket: str | None = None) -> None:
        self.settings = settings
        self.bucket = bucket or settings.data_bucket

    @cached_property
    def client(self) -> Minio:
        return minio_client(self.settings)

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)
            log.info("created bucket %s", self.bucket)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (recursive), in key order."""
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            if obj.is_dir:
                continue
            yield ObjectInfo(
                key=obj.object_name,
                etag=(obj.etag or "").strip('"'),
                size=obj.size or 0,
                last_modified=obj.last_modified,
            )

    def subfolders(self, prefix: str) -> list[str]:
        """The "folders" right under ``prefix`` (which ends in ``/``): ``prefix/<name>/``, in key order."""
        found = self.client.list_objects(self.bucket, prefix=prefix, recursive=False)
        return [obj.object_name for obj in found if obj.is_dir]

    def stat(self, key: str) -> ObjectInfo | None:
        """Object metadata, or None if the key does not exist."""
        try:
            st = self.client.stat_object(self.bucket, key)
        except S3Error as err:
            if err.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                return None
            raise
        return ObjectInfo(key, (st.etag or "").strip('"'), st.size or 0, st.last_modified)

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def get_bytes(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Write ``data`` to ``key`` (overwriting) and return its etag."""
        result = self.client.put_object(
            self.bucket, key, io.BytesIO(data), length=len(data), content_type=content_type
        )
        return (result.etag or "").strip('"')

    def put_json(self, key: str, payload: Any) -> str:
        body = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        return self.put_bytes(key, body, "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        self.client.fput_object(
            self.bucket, key, str(path), content_type=content_type or guess_type(path.name)
        )

    def copy(self, src_key: str, dst_key: str) -> None:
        self.client.copy_object(self.bucket, dst_key, CopySource(self.bucket, src_key))

    def remove(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def move(self, src_key: str, dst_key: str) -> None:
        """Copy, verify the copy (size and etag), then delete the source: never lose an object.

        Safe to repeat: if the source is already gone and the copy exists, it was moved before.
        """
        src = self.stat(src_key)
        if src is None:
            if self.exists(dst_key):
                log.info("%s already moved to %s", src_key, dst_key)
                return
            raise FileNotFoundError(f"s3://{self.bucket}/{src_key} is missing and was never moved")
        self.copy(src_key, dst_key)
        dst = self.stat(dst_key)
        if dst is None or dst.size != src.size or dst.etag != src.etag:
            raise OSError(
                f"copy of s3://{self.bucket}/{src_key} to {dst_key} did not verify "
                f"(source {src.size} B etag {src.etag}, copy {dst}); source kept"
            )
        self.remove(src_key)


def guess_type(name: str) -> str:
    """Content type from a file name's suffix (for uploads and for serving reports)."""
    for suffix, kind in (
        (".html", "text/html"),
        (".json", "application/json"),
        (".css", "text/css"),
        (".js", "application/javascript"),
        (".png", "image/png"),
        (".svg", "image/svg+xml"),
        (".parquet", "application/vnd.apache.parquet"),
    ):
        if name.endswith(suffix):
            return kind
    return "application/octet-stream"
