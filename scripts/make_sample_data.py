"""Rebuild the sample data in ``data/`` from the full files in ``../shared/data`` (when present).

``data/`` is what a clone runs on: the demo, ``python -m ml.seed``, the benchmarks and the tests
read it (paths in ``ml/sample_data.py``). This script documents how it was made and rebuilds it
byte-for-byte where the full files are at hand; ``--check`` only compares. See ``data/README.md``.

    .venv/bin/python scripts/make_sample_data.py [--source ../shared/data] [--check]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from ml.sample_data import AGNEWS_SAMPLE, NEWSGROUPS_SAMPLE  # noqa: E402

DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data"
POSTS_PER_GROUP = 25  # x 20 newsgroups = 500 posts: the demo and tests send 300-400 of them
MIN_CHARS, MAX_CHARS = 20, 3000  # what the demo sends: no empty posts, no 100 kB FAQs
SEED = 0


def newsgroups_subset(full: pd.DataFrame) -> pd.DataFrame:
    """``POSTS_PER_GROUP`` posts of every newsgroup, 20 to 3,000 characters, in the full file's order."""
    length = full["text"].str.strip().str.len()
    fitting = full[length.between(MIN_CHARS, MAX_CHARS)]
    picked = fitting.groupby("label").sample(n=POSTS_PER_GROUP, random_state=SEED)
    return picked.sort_index().reset_index(drop=True)[["text", "label"]]


def gzipped_csv(frame: pd.DataFrame) -> bytes:
    """The CSV, gzipped without a timestamp or file name: the same rows give the same bytes."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
        fh.write(frame.to_csv(index=False).encode())
    return raw.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the full files")
    parser.add_argument("--check", action="store_true", help="compare with data/, write nothing")
    args = parser.parse_args(argv)
    agnews_full = args.source / "agnews_5600.csv.gz"
    news_full = args.source / "20newsgroups_test.csv.gz"
    missing = [str(p) for p in (agnews_full, news_full) if not p.exists()]
    if missing:
        print(f"not found: {', '.join(missing)}; pass --source FOLDER", file=sys.stderr)
        return 2
    wanted = {
        AGNEWS_SAMPLE: agnews_full.read_bytes(),  # shipped as is
        NEWSGROUPS_SAMPLE: gzipped_csv(newsgroups_subset(pd.read_csv(news_full))),
    }
    differ = []
    for path, content in wanted.items():
        digest = hashlib.sha256(content).hexdigest()[:16]
        same = path.exists() and path.read_bytes() == content
        if not same:
            differ.append(path)
        if not args.check and not same:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        rows = len(pd.read_csv(io.BytesIO(content), compression="gzip"))
        state = "unchanged" if same else ("differs" if args.check else "written")
        print(f"{path.relative_to(REPO_ROOT)}: {rows} rows, {len(content):,} bytes, sha256 {digest}… {state}")
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
