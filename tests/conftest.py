"""Shared test fixtures: isolated settings and sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

# Great Expectations must not try to phone home from tests either.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
AGNEWS = DATA_DIR / "agnews_5600.csv.gz"


@pytest.fixture(scope="session")
def agnews() -> pd.DataFrame:
    if not AGNEWS.exists():
        pytest.fail(f"{AGNEWS} is missing: the tests need ../shared/data beside the checkout")
    return pd.read_csv(AGNEWS)


@pytest.fixture
def small_batch(agnews: pd.DataFrame) -> pd.DataFrame:
    """40 real AG News rows, 10 per class."""
    return agnews.groupby("label", group_keys=False).head(10).reset_index(drop=True)
