"""What every pipeline DAG shares: task defaults and the ``dataset`` param.

Cheap at parse time (standard library and ``airflow.sdk`` only).
"""

from __future__ import annotations

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
