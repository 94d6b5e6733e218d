from __future__ import annotations

import pytest
from pydantic import ValidationError

from ml.settings import Settings


def test_defaults_point_at_the_local_stack(monkeypatch):
    for name in ("CT_S3_ENDPOINT", "CT_MLFLOW_TRACKING_URI", "CT_ALLOWED_LABELS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.s3_endpoint == "127.0.0.1:9000"
    assert settings.s3_url == "http://127.0.0.1:9000"
    assert settings.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert settings.allowed_labels == ()


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("CT_S3_ENDPOINT", "minio:9000")
    monkeypatch.setenv("CT_S3_SECURE", "true")
    monkeypatch.setenv("CT_ALLOWED_LABELS", " World, Sports ,,")
    monkeypatch.setenv("CT_MAX_DUPLICATE_RATE", "0.05")
    settings = Settings()
    assert settings.s3_url == "https://minio:9000"
    assert settings.allowed_labels == ("World", "Sports")
    assert settings.max_duplicate_rate == 0.05


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CT_MAX_DUPLICATE_RATE": "1.5"}, "max_duplicate_rate"),
        ({"CT_TEXT_COLUMN": "label"}, "CT_TEXT_COLUMN and CT_LABEL_COLUMN"),
        ({"CT_MIN_TEXT_CHARS": "50", "CT_MAX_TEXT_CHARS": "10"}, "CT_MIN_TEXT_CHARS"),
    ],
)
def test_bad_configuration_is_rejected_with_the_field_named(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()
