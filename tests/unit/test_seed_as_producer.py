"""``ml.seed`` works with a data producer's S3 user, which may write under raw/ and nothing else
(docker/minio/producer.json): it may not even check that the bucket exists."""

from __future__ import annotations

import pytest
from minio.error import S3Error

from ml.seed import seed_raw
from ml.settings import Settings


class ProducerStore:
    """Refuses what docker/minio/producer.json refuses: everything but writing under raw/."""

    bucket = "ct-data"

    def __init__(self, refusal: str = "AccessDenied") -> None:
        self.refusal = refusal
        self.written: list[str] = []

    def ensure_bucket(self) -> None:
        raise S3Error(None, self.refusal, "refused", "/ct-data", "r", "h", bucket_name="ct-data")

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> str:
        assert key.startswith("raw/"), key
        self.written.append(key)
        return key


def test_seeding_with_a_write_only_user_writes_the_batches(tmp_path, small_batch) -> None:
    source = tmp_path / "seed.csv"
    small_batch.to_csv(source, index=False)
    store = ProducerStore()
    keys = seed_raw(Settings(), source, batches=2, store=store)
    assert store.written == keys and len(keys) == 2


def test_other_s3_errors_still_fail(tmp_path, small_batch) -> None:
    source = tmp_path / "seed.csv"
    small_batch.to_csv(source, index=False)
    with pytest.raises(S3Error, match="NoSuchBucket"):
        seed_raw(Settings(), source, batches=2, store=ProducerStore("NoSuchBucket"))
