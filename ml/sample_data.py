"""Where the sample data shipped with the repository lives (``data/``, see ``data/README.md``).

The demo, ``python -m ml.seed``, the benchmarks and the tests read these files, so a plain clone
runs them with nothing beside it. ``scripts/make_sample_data.py`` rebuilds them.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
AGNEWS_SAMPLE = SAMPLE_DATA_DIR / "agnews_5600.csv.gz"  # text,label: 1,400 rows per AG News class
NEWSGROUPS_SAMPLE = SAMPLE_DATA_DIR / "20newsgroups_test_500.csv.gz"  # text,label: 25 posts per group
SAMPLE_FILES = (AGNEWS_SAMPLE, NEWSGROUPS_SAMPLE)
