"""The local stack's Serve ingress switch (CT_SERVE_INGRESS), without starting Ray.

The default is Serve's Python proxy: Ray 2.60's HAProxy ingress binds its stats page and
Prometheus exporter on every interface, which the stack's loopback-only rule forbids
(tests/integration/test_exposure.py). ``haproxy`` is an opt-in; its admin socket (HAProxy's
``level admin``, mode 666) and config then live in the stack's private state folder, not in /tmp.
"""

from __future__ import annotations

import sys

import pytest

from ml.settings import Settings
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import stack


def _ray_env(tmp_path):
    settings = Settings(state_dir=str(tmp_path / "state"))
    return settings, stack._services(settings)["ray"].env


def test_the_default_ingress_is_the_python_proxy(tmp_path, monkeypatch):
    monkeypatch.delenv("CT_SERVE_INGRESS", raising=False)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    _, env = _ray_env(tmp_path)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env


def test_haproxy_keeps_its_admin_socket_and_config_in_the_private_state(tmp_path, monkeypatch):
    monkeypatch.setenv("CT_SERVE_INGRESS", "HAProxy")
    settings, env = _ray_env(tmp_path)
    home = tmp_path / "state" / "ray" / "haproxy"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(home / "admin.sock")
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == str(home / "haproxy.cfg")
    assert not home.exists()  # building the service definitions has no side effects
    stack._prepare_ray(settings)
    assert home.is_dir() and (home.stat().st_mode & 0o777) == 0o700


def test_an_unknown_ingress_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CT_SERVE_INGRESS", "nginx")
    with pytest.raises(SystemExit, match="CT_SERVE_INGRESS must be one of"):
        _ray_env(tmp_path)
