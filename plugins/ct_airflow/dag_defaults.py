"""What every pipeline DAG shares: task defaults and the ``dataset`` param.

Cheap at parse time (standard library and ``airflow.sdk`` only).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Param

from ct_airflow.failures import explain_failure


def default_args(execution_timeout: timedelta, **extra: Any) -> dict[str, Any]:
    """Owner, two retries a minute apart, the task timeout, and failure messages naming the stage."""
    return {
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": execution_timeout,
        "on_failure_callback": explain_failure,
        **extra,
    }


def dataset_param(purpose: str) -> Param:
    """The optional ``dataset`` param: ``purpose`` says what the DAG does with it ("train on")."""
    return Param(
        None,
        type=["null", "string"],
        title="Dataset",
        description=f"Dataset under raw/ to {purpose}; empty uses CT_DATASET (default agnews).",
    )


def env_int(name: str, default: int) -> int:
    """An integer DAG default from the environment (e.g. the box's GPU count), or a clear error."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def env_flag(name: str, default: bool) -> bool:
    """A boolean DAG default from the environment: true/false, 1/0, yes/no."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes"}:
        return True
    if value in {"0", "false", "no"}:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def env_float(name: str, default: float) -> float:
    """A number DAG default from the environment, or a clear error."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` from the environment, or a clear error."""
    value = os.environ.get(name, "").strip() or default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
