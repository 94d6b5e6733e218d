"""Reading raw batch files (CSV, JSONL, Parquet; optionally gzipped) into DataFrames.

Every failure becomes a :class:`BatchFormatError` whose message names the object and the
problem (``not valid UTF-8 at byte 17``, ``line 3: expected 2 fields, saw 3``), so the data gate
can quarantine the batch with that reason instead of crashing the task.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib

import pandas as pd

FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


class BatchFormatError(ValueError):
    """A raw object that cannot be read as a table of text and labels."""


def file_format(key: str) -> tuple[str, bool]:
    """``(format, gzipped)`` for an object key, from its extension."""
    name = key.rsplit("/", 1)[-1].lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[:-3]
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt, gzipped
    raise BatchFormatError(
        f"{key}: unsupported file type; use one of {', '.join(sorted(FORMATS))} (optionally .gz)"
    )


def parse_batch_file(key: str, data: bytes) -> pd.DataFrame:
    """Parse one raw object; every column comes back as strings (nulls stay null)."""
    fmt, gzipped = file_format(key)
    if gzipped:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise BatchFormatError(f"{key}: not a valid gzip file ({err})") from err
    if not data.strip():
        raise BatchFormatError(f"{key}: empty file (no header, no rows)")
    if fmt == "parquet":
        frame = _read_parquet(key, data)
    else:
        text = _decode(key, data)
        frame = _read_csv(key, text) if fmt == "csv" else _read_jsonl(key, text)
    return _as_strings(frame)


def _decode(key: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise BatchFormatError(
            f"{key}: not valid UTF-8 at byte {err.start} (line {line}): {err.reason}; "
            "re-export the file as UTF-8"
        ) from err
    return text.removeprefix("\ufeff")


def _read_csv(key: str, text: str) -> pd.DataFrame:
    # The Python csv module gives exact line numbers and rejects ragged rows, unlike
    # pandas' C parser which silently pads short rows.
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        rows = []
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise BatchFormatError(
                    f"{key}: line {reader.line_num}: expected {len(header)} fields "
                    f"({','.join(header)}), saw {len(row)}; quote fields that contain commas"
                )
            rows.append(row)
    except csv.Error as err:
        raise BatchFormatError(f"{key}: malformed CSV at line {reader.line_num}: {err}") from err
    if len(set(header)) != len(header):
        raise BatchFormatError(f"{key}: duplicate column names in header {header}")
    return pd.DataFrame(rows, columns=header)


def _read_jsonl(key: str, text: str) -> pd.DataFrame:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BatchFormatError(f"{key}: line {number}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise BatchFormatError(
                f"{key}: line {number}: expected a JSON object per line, got {type(record).__name__}"
            )
        records.append(record)
    return pd.DataFrame.from_records(records)


def _read_parquet(key: str, data: bytes) -> pd.DataFrame:
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise BatchFormatError(f"{key}: unreadable Parquet ({type(err).__name__}: {err})") from err


def _as_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Labels and texts are categories and strings; keep nulls as None so checks can see them."""
    out = frame.astype(object)
    out.columns = [str(c) for c in out.columns]
    return out.apply(lambda col: col.map(lambda v: None if _is_null(v) else str(v)))


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)
