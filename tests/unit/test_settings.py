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


def test_settings_handed_to_a_ray_job_read_back_the_same(monkeypatch):
    """What settings_env gives a Ray job / Serve replica must load there (no 'None' strings)."""
    import os

    from ml.settings import settings_env

    tuned = Settings(serve_num_gpus=0.5, serve_target="rayservice", ray_autoscaling=True)
    for configured in (tuned, Settings()):
        for key in [k for k in os.environ if k.startswith("CT_")]:
            monkeypatch.delenv(key)
        for key, value in settings_env(configured, include_secrets=True).items():
            monkeypatch.setenv(key, value)
        assert Settings() == configured


def test_train_workers_runtime_env_carries_no_secret(monkeypatch):
    """The Train workers' runtime_env shows in the Ray dashboard: the node env has the credentials."""
    from ml.train import _worker_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("CT_S3_SECRET_KEY", "s3cret")
    monkeypatch.setenv("CT_SERVE_API_TOKEN", "tok")
    monkeypatch.setenv("CT_DATASET", "agnews")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/state/ray/auth_token")
    env = _worker_env()
    assert "s3cret" not in env.values() and "tok" not in env.values() and "key-id" not in env.values()
    assert env["CT_DATASET"] == "agnews" and env["RAY_AUTH_TOKEN_PATH"] == "/state/ray/auth_token"
