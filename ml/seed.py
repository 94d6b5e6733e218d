"""Seed ``raw/<dataset>/`` with dated batches cut from a local labelled CSV.

``python -m ml.seed`` loads ``../shared/data/agnews_5600.csv.gz`` as several daily batches
ending yesterday, so a fresh install has data for its first run. ``--bad-batch`` adds one
deliberately corrupt batch (unknown labels, empty texts) to show the quarantine path.
"""

from __future__ import annotations

import argparse
import io
import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
from minio.error import S3Error

from ml.settings import REPO_ROOT, Settings
from ml.storage import RAW, ObjectStore

log = logging.getLogger(__name__)

DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "agnews_5600.csv.gz"


def batch_frames(frame: pd.DataFrame, batches: int, seed: int = 0) -> list[pd.DataFrame]:
    """Shuffle and cut into ``batches`` near-equal parts (each keeps every class)."""
    shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    size = -(-len(shuffled) // batches)
    return [shuffled.iloc[i * size : (i + 1) * size] for i in range(batches)]


def balanced_sample(frame: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    """About ``rows`` rows, the same number of each label; ``seed`` picks which (index kept)."""
    per_class = max(1, rows // frame["label"].nunique())
    return frame.groupby("label").sample(n=per_class, random_state=seed)


def seed_raw(
    settings: Settings,
    source: Path = DEFAULT_SOURCE,
    *,
    batches: int = 4,
    rows: int | None = None,
    end: date | None = None,
    bad_batch: bool = False,
    batch_suffix: str = "",
    seed: int = 0,
    store: ObjectStore | None = None,
) -> list[str]:
    """Upload the batches as ``raw/<dataset>/<YYYY-MM-DD><suffix>/part-000.csv``; returns the keys.

    ``rows`` takes a class-balanced random sample (``seed`` picks which rows)."""
    if not source.exists():
        raise FileNotFoundError(f"seed data {source} not found; pass --source PATH")
    store = store or ObjectStore(settings)
    try:
        store.ensure_bucket()
    except S3Error as err:
        if err.code != "AccessDenied":
            raise
        # a data producer's S3 user may only write under raw/ (docker/minio/producer.json)
        log.info("may not check bucket %s (%s): writing under %s/ anyway", store.bucket, err.code, RAW)
    frame = pd.read_csv(source)
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{source} lacks columns {sorted(missing)}; expected a text,label CSV")
    if rows is not None:
        frame = balanced_sample(frame, rows, seed)
    frame = frame.rename(columns={"text": settings.text_column, "label": settings.label_column})
    end = end or (datetime.now(UTC).date() - timedelta(days=1))
    keys = []
    parts = batch_frames(frame, batches, seed=seed)
    for offset, part in enumerate(parts):
        day = end - timedelta(days=len(parts) - 1 - offset)
        key = f"{RAW}/{settings.dataset}/{day.isoformat()}{batch_suffix}/part-000.csv"
        store.put_bytes(key, part.to_csv(index=False).encode(), "text/csv")
        keys.append(key)
        log.info("seeded %s (%d rows)", key, len(part))
    if bad_batch:
        keys.append(_seed_bad_batch(settings, store, frame, end))
    return keys


def _seed_bad_batch(settings: Settings, store: ObjectStore, frame: pd.DataFrame, day: date) -> str:
    """A batch a careless export could produce: mislabelled rows and blank texts."""
    bad = frame.sample(40, random_state=1).copy()
    bad.iloc[:15, bad.columns.get_loc(settings.label_column)] = "Sprots"
    bad.iloc[15:25, bad.columns.get_loc(settings.text_column)] = "   "
    key = f"{RAW}/{settings.dataset}/{day.isoformat()}_export-2/part-000.csv"
    buffer = io.StringIO()
    bad.to_csv(buffer, index=False)
    store.put_bytes(key, buffer.getvalue().encode(), "text/csv")
    log.info("seeded a deliberately bad batch %s (%d rows)", key, len(bad))
    return key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rows", type=int, default=None, help="use only about this many rows")
    parser.add_argument("--end", type=date.fromisoformat, default=None, help="last batch date")
    parser.add_argument("--bad-batch", action="store_true", help="also seed a corrupt batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    keys = seed_raw(
        Settings(),
        args.source,
        batches=args.batches,
        rows=args.rows,
        end=args.end,
        bad_batch=args.bad_batch,
    )
    print(f"seeded {len(keys)} objects into s3://{Settings().data_bucket}/{RAW}/{Settings().dataset}/")


if __name__ == "__main__":
    main()
