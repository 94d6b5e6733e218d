"""A minimal Python client of the classifier service (what an application's HTTP call looks like).

from serve.client import predict
answers = predict("http://127.0.0.1:8000", ["Stocks fell sharply", "The match ended 2-1"])
# [{"label": "Business", "score": 0.93}, {"label": "Sports", "score": 0.98}]
"""

from __future__ import annotations

import os
from typing import Any

import requests

MAX_TEXTS_PER_REQUEST = 64  # the service's default max_texts_per_request


class ServiceError(RuntimeError):
    """The service refused or failed a request; the message carries its status and detail."""


def predict(
    serve_url: str,
    texts: list[str],
    *,
    chunk: int = 16,
    token: str | None = None,
    timeout: float = 60,
    session: requests.Session | None = None,
) -> list[dict[str, Any]]:
    """POST ``texts`` to ``/v1/predict``, ``chunk`` per request; one prediction per text, in order.

    ``token`` defaults to ``CT_SERVE_API_TOKEN`` from the environment (the service's own setting).
    """
    if not 1 <= chunk <= MAX_TEXTS_PER_REQUEST:
        raise ValueError(f"chunk must be 1..{MAX_TEXTS_PER_REQUEST}, got {chunk}")
    http = session or requests.Session()
    token = token or os.environ.get("CT_SERVE_API_TOKEN")  # serve.app.API_TOKEN_ENV
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    predictions: list[dict[str, Any]] = []
    try:
        for i in range(0, len(texts), chunk):
            resp = http.post(
                f"{serve_url.rstrip('/')}/v1/predict",
                json={"texts": texts[i : i + chunk]},
                headers=headers,
                timeout=timeout,
            )
            if resp.status_code != 200:
                raise ServiceError(f"POST /v1/predict -> {resp.status_code}: {resp.text[:300]}")
            predictions.extend(resp.json()["predictions"])
    finally:
        if session is None:
            http.close()
    return predictions
