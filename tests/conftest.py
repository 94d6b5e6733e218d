"""Shared test fixtures: isolated settings and sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from ml.sample_data import AGNEWS_SAMPLE, NEWSGROUPS_SAMPLE

# Great Expectations must not try to phone home from tests either.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The sample data shipped in data/ (see data/README.md): a plain clone has all the tests need.
AGNEWS = AGNEWS_SAMPLE
NEWSGROUPS = NEWSGROUPS_SAMPLE


@pytest.fixture(scope="session")
def agnews() -> pd.DataFrame:
    if not AGNEWS.exists():
        pytest.fail(f"{AGNEWS} is missing: it ships with the repository (data/README.md)")
    return pd.read_csv(AGNEWS)


@pytest.fixture
def small_batch(agnews: pd.DataFrame) -> pd.DataFrame:
    """40 real AG News rows, 10 per class."""
    return agnews.groupby("label", group_keys=False).head(10).reset_index(drop=True)
