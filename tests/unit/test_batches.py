"""Reading raw batch files: every malformed input gets a BatchFormatError naming the problem."""

from __future__ import annotations

import gzip
import io
import json

import pandas as pd
import pytest

from ml.batches import BatchFormatError, file_format, parse_batch_file

KEY = "raw/agnews/2026-01-01/part.csv"


def test_csv_round_trip_keeps_strings_and_empty_texts():
    data = b'text,label\n"Stocks rally, again",Business\n,World\n'
    frame = parse_batch_file(KEY, data)
    assert list(frame.columns) == ["text", "label"]
    assert frame["text"].tolist() == ["Stocks rally, again", ""]
    assert frame["label"].tolist() == ["Business", "World"]


def test_csv_with_byte_order_mark_and_crlf():
    frame = parse_batch_file(KEY, "\ufefftext,label\r\nhello,World\r\n".encode())
    assert frame.to_dict("records") == [{"text": "hello", "label": "World"}]


@pytest.mark.parametrize(
    ("key", "data", "message"),
    [
        (KEY, b"", "empty file"),
        (KEY, b"   \n", "empty file"),
        (KEY, b"text,label\nok,World\n\xff\xfebad,World\n", "not valid UTF-8 at byte 20 (line 3)"),
        (KEY, b"text,label\na,b,c\n", "line 2: expected 2 fields (text,label), saw 3"),
        (KEY, b'text,label\n"unterminated,World\n', "malformed CSV"),
        (KEY, b"text,text\na,b\n", "duplicate column names"),
        ("raw/x/1/part.jsonl", b'{"text": "a", "label": "b"}\n{"text": "a",\n', "line 2: invalid JSON"),
        ("raw/x/1/part.jsonl", b'["a", "b"]\n', "line 1: expected a JSON object per line, got list"),
        ("raw/x/1/part.parquet", b"PAR1 not really parquet", "unreadable Parquet"),
        ("raw/x/1/part.csv.gz", b"not gzip at all", "not a valid gzip file"),
        ("raw/x/1/part.xlsx", b"whatever", "unsupported file type"),
    ],
)
def test_malformed_inputs_raise_a_named_error(key, data, message):
    with pytest.raises(BatchFormatError) as err:
        parse_batch_file(key, data)
    assert message in str(err.value)
    assert key in str(err.value)


def test_jsonl_parquet_and_gzip_are_read():
    records = [{"text": "a", "label": 1}, {"text": None, "label": "x"}]
    jsonl = "\n".join(json.dumps(r) for r in records).encode()
    frame = parse_batch_file("raw/x/1/a.jsonl", jsonl)
    # labels become strings (categories), nulls stay null for the gate to see
    assert frame["label"].tolist() == ["1", "x"]
    assert frame["text"].tolist() == ["a", None]

    buffer = io.BytesIO()
    pd.DataFrame({"text": ["p"], "label": ["q"]}).to_parquet(buffer)
    assert parse_batch_file("raw/x/1/a.parquet", buffer.getvalue())["text"].tolist() == ["p"]

    gz = gzip.compress(b"text,label\nz,World\n")
    assert parse_batch_file("raw/x/1/a.csv.gz", gz)["text"].tolist() == ["z"]


def test_huge_text_is_read_not_truncated():
    huge = "word " * 1_000_000  # 5 MB in one field: over csv's default field limit
    frame = parse_batch_file(KEY, f'text,label\n"{huge}",World\n'.encode())
    assert len(frame["text"].iloc[0]) == len(huge)


def test_missing_column_is_not_a_parse_error():
    # Schema problems are the data gate's job, so they are reported as failed expectations.
    frame = parse_batch_file(KEY, b"body,label\nhello,World\n")
    assert list(frame.columns) == ["body", "label"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [("a/b.CSV", ("csv", False)), ("a/b.jsonl.gz", ("jsonl", True)), ("a/b.parquet", ("parquet", False))],
)
def test_file_format(key, expected):
    assert file_format(key) == expected
