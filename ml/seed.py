"""Seed ``raw/<dataset>/`` with dated batches cut from a local labelled CSV.

``python -m ml.seed`` loads ``data/agnews_5600.csv.gz`` (shipped with the repository) as several
daily batches ending yesterday, so a fresh install has data for its first run. ``--bad-batch`` adds
one deliberately corrupt batch (unknown labels, empty texts) to show the quarantine path.
``--dry-run`` reads and cuts the batches and prints what it would upload, touching no S3.
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
from minio.error import S3Error

from ml.sample_data import AGNEWS_SAMPLE
from ml.settings import Settings
from ml.storage import RAW, ObjectStore

log = logging.getLogger(__name__)

DEFAULT_SOURCE = AGNEWS_SAMPLE


def batch_frames(frame: pd.DataFrame, batches: int, seed: int = 0) -> list[pd.DataFrame]:
    """Shuffle and cut into ``batches`` near-equal parts (each keeps every class)."""
    shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    size = -(-len(shuffled) // batches)
    return [shuffled.iloc[i * size : (i + 1) * size] for i in range(batches)]


def balanced_sample(frame: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    """About ``rows`` rows, the same number of each label; ``seed`` picks which (index kept)."""
    per_class = max(1, rows // frame["label"].nunique())
    return frame.groupby("label").sample(n=per_class, random_state=seed)


def plan_batches(
    settings: Settings,
    source: Path = DEFAULT_SOURCE,
    *,
    batches: int = 4,
    rows: int | None = None,
    end: date | None = None,
    bad_batch: bool = False,
    batch_suffix: str = "",
    seed: int = 0,
) -> list[tuple[str, pd.DataFrame]]:
    """Read ``source`` and cut it into the ``(key, rows)`` pairs that :func:`seed_raw` uploads.

    Touches no S3. ``rows`` takes a class-balanced random sample (``seed`` picks which rows)."""
    if not source.exists():
        raise FileNotFoundError(f"seed data {source} not found; pass --source PATH")
    frame = pd.read_csv(source)
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{source} lacks columns {sorted(missing)}; expected a text,label CSV")
    if rows is not None:
        frame = balanced_sample(frame, rows, seed)
    frame = frame.rename(columns={"text": settings.text_column, "label": settings.label_column})
    end = end or (datetime.now(UTC).date() - timedelta(days=1))
    parts = batch_frames(frame, batches, seed=seed)
    planned = []
    for offset, part in enumerate(parts):
        day = end - timedelta(days=len(parts) - 1 - offset)
        planned.append((f"{RAW}/{settings.dataset}/{day.isoformat()}{batch_suffix}/part-000.csv", part))
    if bad_batch:
        planned.append(_bad_batch(settings, frame, end))
    return planned


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
    planned = plan_batches(
        settings,
        source,
        batches=batches,
        rows=rows,
        end=end,
        bad_batch=bad_batch,
        batch_suffix=batch_suffix,
        seed=seed,
    )
    store = store or ObjectStore(settings)
    try:
        store.ensure_bucket()
    except S3Error as err:
        if err.code != "AccessDenied":
            raise
        # a data producer's S3 user may only write under raw/ (docker/minio/producer.json)
        log.info("may not check bucket %s (%s): writing under %s/ anyway", store.bucket, err.code, RAW)
    for key, part in planned:
        store.put_bytes(key, part.to_csv(index=False).encode(), "text/csv")
        log.info("seeded %s (%d rows)", key, len(part))
    return [key for key, _ in planned]


def _bad_batch(settings: Settings, frame: pd.DataFrame, day: date) -> tuple[str, pd.DataFrame]:
    """A batch a careless export could produce: mislabelled rows and blank texts."""
    bad = frame.sample(40, random_state=1).copy()
    bad.iloc[:15, bad.columns.get_loc(settings.label_column)] = "Sprots"
    bad.iloc[15:25, bad.columns.get_loc(settings.text_column)] = "   "
    return f"{RAW}/{settings.dataset}/{day.isoformat()}_export-2/part-000.csv", bad


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rows", type=int, default=None, help="use only about this many rows")
    parser.add_argument("--end", type=date.fromisoformat, default=None, help="last batch date")
    parser.add_argument("--bad-batch", action="store_true", help="also seed a corrupt batch")
    parser.add_argument("--dry-run", action="store_true", help="read and cut the batches, upload nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings()
    options = {"batches": args.batches, "rows": args.rows, "end": args.end, "bad_batch": args.bad_batch}
    if args.dry_run:
        planned = plan_batches(settings, args.source, **options)
        for key, part in planned:
            counts = part[settings.label_column].value_counts().sort_index()
            print(f"would upload s3://{settings.data_bucket}/{key}: {len(part)} rows ({counts.to_dict()})")
        print(f"dry run: {len(planned)} objects from {args.source}; nothing uploaded")
        return
    keys = seed_raw(settings, args.source, **options)
    print(f"seeded {len(keys)} objects into s3://{settings.data_bucket}/{RAW}/{settings.dataset}/")


if __name__ == "__main__":
    main()
