"""Validate: the data gate. A Great Expectations 1.x suite checks every batch of a snapshot.

A batch that fails (or could not even be parsed) is moved to ``quarantine/`` with its
validation result (JSON) and Data Docs page, and never reaches training. The rows of the
batches that pass are written to ``snapshots/<id>/validated.parquet`` with canonical column
names ``text`` and ``label``. If no batch passes, :class:`NoValidDataError` says why.

Allowed labels: ``CT_ALLOWED_LABELS`` when set. Otherwise they are inferred: the labels accepted
by earlier snapshots of the dataset, or, for the very first snapshot, every label with at least
``CT_MIN_ROWS_PER_CLASS`` rows across its readable batches. A new class therefore needs
``CT_ALLOWED_LABELS`` (or a first snapshot) to be accepted, which is deliberate: a typo such as
``Sprots`` must not silently become a fifth class.
"""

from __future__ import annotations

import copy
import hashlib
import html as html_text
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ml.settings import Settings
from ml.storage import QUARANTINE, RAW, REPORTS, SNAPSHOTS, ObjectStore

log = logging.getLogger(__name__)

SUITE_NAME = "text_classification_batch"
LABEL_COUNT_COLUMN = "rows_with_same_label"
# GX sends usage statistics unless told not to; this pipeline never phones home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


class NoValidDataError(RuntimeError):
    """Every batch of a snapshot was quarantined: there is nothing to train on."""


@dataclass
class BatchVerdict:
    batch_id: str
    rows: int
    success: bool
    failures: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    html: Path | None = None


def build_suite(settings: Settings, allowed_labels: list[str]):  # -> gx.ExpectationSuite
    """The expectation suite, as code: schema, non-empty text, labels, lengths, duplicates, balance."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    text, label = settings.text_column, settings.label_column
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for expectation in (
        gxe.ExpectColumnToExist(column=text),
        gxe.ExpectColumnToExist(column=label),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column=text),
        gxe.ExpectColumnValuesToNotBeNull(column=label),
        gxe.ExpectColumnValuesToNotMatchRegex(column=text, regex=r"^\s*$"),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column=text, min_value=settings.min_text_chars, max_value=settings.max_text_chars
        ),
        gxe.ExpectColumnValuesToBeInSet(column=label, value_set=sorted(allowed_labels)),
        gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column=text, min_value=1.0 - settings.max_duplicate_rate, max_value=1.0
        ),
        # Per-row count of rows sharing the row's label: a class with too few rows fails here.
        gxe.ExpectColumnValuesToBeBetween(column=LABEL_COUNT_COLUMN, min_value=settings.min_rows_per_class),
    ):
        suite.add_expectation(expectation)
    return suite


class DataGate:
    """Runs the suite over batches in one ephemeral GX context with a local Data Docs site."""

    def __init__(self, settings: Settings, allowed_labels: list[str], docs_dir: Path) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.settings = settings
        self.docs_dir = docs_dir
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        for site in list(self.context.list_data_docs_sites()):
            self.context.delete_data_docs_site(site)
        self.context.add_data_docs_site(
            "pipeline",
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        self.suite = self.context.suites.add(build_suite(settings, allowed_labels))
        self.source = self.context.data_sources.add_pandas("batches")

    def check(self, batch_id: str, frame: pd.DataFrame) -> BatchVerdict:
        import great_expectations as gx

        label = self.settings.label_column
        frame = frame.drop(columns=[c for c in frame.columns if c.startswith("_")])
        if label in frame.columns:
            frame[LABEL_COUNT_COLUMN] = frame.groupby(label, dropna=False)[label].transform("size")
        else:
            frame[LABEL_COUNT_COLUMN] = len(frame)
        # The batch id is part of an uploaded object's key: GX gets a name that is safe in HTML
        # (its Data Docs write asset names into the pages unescaped) and in a file name.
        name = gx_safe_name(batch_id)
        asset = self.source.add_dataframe_asset(f"batch-{name}")
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(
                name=f"validate {name}",
                data=asset.add_batch_definition_whole_dataframe("whole batch"),
                suite=self.suite,
            )
        )
        checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(
                name=f"gate {name}",
                validation_definitions=[definition],
                actions=[],  # Data Docs are built below, from an HTML-escaped copy of the result
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        ((identifier, result),) = outcome.run_results.items()
        self._build_data_docs(identifier, result)
        failures = summarize_failures([r for r in result.results if not r.success])
        *folders, page = identifier.to_tuple()  # not with_suffix: a "." in the batch name is no suffix
        html = self.docs_dir.joinpath("validations", *folders, f"{page}.html")
        return BatchVerdict(
            batch_id=batch_id,
            rows=len(frame),
            success=bool(result.success),
            failures=failures,
            result=result.to_json_dict(),
            html=html if html.exists() else None,
        )

    def _build_data_docs(self, identifier: Any, result: Any) -> None:
        """Data Docs of one validation, rendered from :func:`docs_safe_result` of it: the result
        kept in memory (failures, the JSON report) keeps the real values."""
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
        )

        self.context.validation_results_store.set(identifier, docs_safe_result(result))
        self.context.build_data_docs(
            site_names=["pipeline"],
            resource_identifiers=[identifier, ExpectationSuiteIdentifier(name=SUITE_NAME)],
        )


def gx_safe_name(batch_id: str) -> str:
    """``batch_id`` if it holds only letters, digits, ``.``, ``_`` and ``-``; otherwise those
    characters of it plus a hash of the whole id (distinct ids stay distinct)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", batch_id)
    if safe == batch_id:
        return batch_id
    return f"{safe[:80]}-{hashlib.sha256(batch_id.encode()).hexdigest()[:10]}"


def docs_safe_result(result: Any) -> Any:
    """A copy of a suite validation result with every string that came from the data HTML-escaped.

    GX 1.x Data Docs put an expectation's unexpected values (and its observed value) into the page
    as raw HTML, so a batch with the label ``<img src=x onerror=...>`` ran script in whatever page
    shows its Data Docs. The data reaches a result only through ``result`` (values, counts) and
    ``exception_info`` (an error message may quote a value); the expectation's own arguments are
    ours, and GX escapes them when it renders them.
    """
    safe = copy.deepcopy(result)
    for expectation_result in safe.results:
        expectation_result.result = _escaped(expectation_result.result)
        if expectation_result.exception_info:
            expectation_result.exception_info = _escaped(expectation_result.exception_info)
    return safe


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return html_text.escape(value)
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    return value


def summarize_failures(failed: list[Any]) -> list[str]:
    """Describe failed expectations, missing columns first; checks on a missing column are
    consequences of it and would only repeat the reason."""
    missing = {
        r.expectation_config.kwargs["column"]
        for r in failed
        if r.expectation_config.type == "expect_column_to_exist"
    }
    if missing:
        failed = [
            r
            for r in failed
            if r.expectation_config.type == "expect_column_to_exist"
            or r.expectation_config.kwargs.get("column") not in missing
        ]
    failed.sort(key=lambda r: r.expectation_config.type != "expect_column_to_exist")
    return [describe_failure(r) for r in failed]


def describe_failure(expectation_result: Any) -> str:
    """One line naming a failed expectation and what was observed, for logs and errors."""
    config = expectation_result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in {"batch_id"}}
    column = kwargs.pop("column", None)
    res = expectation_result.result or {}
    exc = expectation_result.exception_info or {}
    if exc.get("raised_exception"):
        detail = (exc.get("exception_message") or "error").splitlines()[0][:200]
    elif config.type == "expect_column_to_exist":
        detail = f"column {column!r} missing"
    elif res.get("unexpected_count") is not None:
        sample = [_short(v) for v in res.get("partial_unexpected_list") or []][:3]
        detail = f"{res['unexpected_count']} unexpected values, e.g. {sample}"
    else:
        detail = f"observed {_short(res.get('observed_value'))}"
    limits = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
    target = f"({column}{', ' if limits else ''}{limits})" if column else f"({limits})"
    return f"{config.type}{target}: {detail}"


def _short(value: Any, limit: int = 60) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}… ({len(value)} chars)"
    if isinstance(value, list) and len(value) > 8:
        return [*value[:8], "…"]
    return value


def known_labels(store: ObjectStore, settings: Settings, exclude: str) -> set[str]:
    """Labels accepted by earlier gate runs of this dataset."""
    labels: set[str] = set()
    for obj in store.list(f"{SNAPSHOTS}/"):
        if obj.key.endswith("/validation.json") and f"/{exclude}/" not in obj.key:
            summary = store.get_json(obj.key)
            if summary.get("dataset") == settings.dataset:
                labels.update(summary.get("labels", []))
    return labels


def resolve_allowed_labels(
    settings: Settings, frames: dict[str, pd.DataFrame], previous: set[str]
) -> tuple[list[str], str]:
    """The allowed label set and where it came from (for the log and the summary)."""
    if settings.allowed_labels:
        return sorted(settings.allowed_labels), "CT_ALLOWED_LABELS"
    if previous:
        return sorted(previous), "earlier snapshots"
    label = settings.label_column
    per_batch = [set(f[label].dropna()) for f in frames.values() if label in f.columns]
    totals = pd.concat(
        [f[label] for f in frames.values() if label in f.columns] or [pd.Series([], dtype=object)]
    ).value_counts()
    quorum = (len(per_batch) + 1) // 2
    inferred = sorted(
        str(name)
        for name, rows in totals.items()
        if rows >= settings.min_rows_per_class and sum(name in labels for labels in per_batch) >= quorum
    )
    return inferred, "inferred from this first snapshot"


def validate_snapshot(
    settings: Settings, snapshot_id: str, store: ObjectStore | None = None
) -> dict[str, Any]:
    """Gate every batch of a snapshot; quarantine failures; write the validated rows and summary."""
    store = store or ObjectStore(settings)
    base = f"{SNAPSHOTS}/{snapshot_id}"
    manifest = store.get_json(f"{base}/manifest.json")
    frames = {
        b["batch_id"]: pd.read_parquet(io.BytesIO(store.get_bytes(b["data_key"])))
        for b in manifest["batches"]
        if b["data_key"] and not b["parse_errors"]
    }
    allowed, source = resolve_allowed_labels(
        settings, frames, known_labels(store, settings, exclude=snapshot_id)
    )
    log.info("allowed labels (%s): %s", source, allowed)

    verdicts: list[BatchVerdict] = []
    with tempfile.TemporaryDirectory(prefix="gx-docs-") as tmp:
        docs_dir = Path(tmp)
        gate = DataGate(settings, allowed, docs_dir) if frames else None
        for batch in manifest["batches"]:
            batch_id = batch["batch_id"]
            if batch["parse_errors"]:
                verdict = BatchVerdict(batch_id, batch["rows"], False, list(batch["parse_errors"]))
            else:
                verdict = gate.check(batch_id, frames[batch_id])
            verdicts.append(verdict)
            if verdict.success:
                log.info("batch %s: passed %s (%d rows)", batch_id, SUITE_NAME, verdict.rows)
            else:
                log.warning("batch %s: FAILED the data gate:", batch_id)
                for failure in verdict.failures:
                    log.warning("    %s", failure)

        docs_prefix = f"{REPORTS}/validation/{snapshot_id}/data_docs"
        if gate is not None:
            for path in sorted(p for p in docs_dir.rglob("*") if p.is_file()):
                store.put_file(f"{docs_prefix}/{path.relative_to(docs_dir).as_posix()}", path)
        quarantined = [
            quarantine_batch(store, settings, manifest, v, docs_prefix, docs_dir)
            for v in verdicts
            if not v.success
        ]

    passed = [v for v in verdicts if v.success]
    validated_key = None
    if passed:
        validated = pd.concat(
            [_canonical(settings, frames[v.batch_id], v.batch_id) for v in passed], ignore_index=True
        )
        validated_key = f"{base}/validated.parquet"
        buffer = io.BytesIO()
        validated.to_parquet(buffer, index=False)
        store.put_bytes(validated_key, buffer.getvalue(), "application/vnd.apache.parquet")

    summary = {
        "snapshot_id": snapshot_id,
        "dataset": settings.dataset,
        "suite": SUITE_NAME,
        "labels": allowed if passed else [],
        "labels_source": source,
        "accepted_batches": [v.batch_id for v in passed],
        "rows_accepted": sum(v.rows for v in passed),
        "quarantined": quarantined,
        "validated_key": validated_key,
        "data_docs": settings.report_link(f"{docs_prefix}/index.html") if frames else None,
    }
    store.put_json(f"{base}/validation.json", summary)
    total = len(verdicts)
    if not passed:
        reasons = "; ".join(f"{q['batch_id']}: {q['reasons'][0]}" for q in quarantined)
        raise NoValidDataError(
            f"validation quarantined {total}/{total} batches of snapshot {snapshot_id}: {reasons}. "
            f"Reports: s3://{store.bucket}/{QUARANTINE}/{settings.dataset}/<batch>/_validation/"
        )
    log.info(
        "data gate: %d/%d batches accepted (%d rows), %d quarantined; Data Docs: %s",
        len(passed),
        total,
        summary["rows_accepted"],
        len(quarantined),
        summary["data_docs"],
    )
    return summary


REPORTS_FOLDER = "_validation"  # quarantine/<dataset>/<batch>/_validation/: the batch's reports


def quarantine_batch(
    store: ObjectStore,
    settings: Settings,
    manifest: dict[str, Any],
    verdict: BatchVerdict,
    docs_prefix: str,
    docs_dir: Path,
) -> dict[str, Any]:
    """Move a failed batch's raw files to quarantine/, report first, so nothing is ever lost."""
    snapshot_id = manifest["snapshot_id"]
    base = f"{QUARANTINE}/{settings.dataset}/{verdict.batch_id}"
    report_key = f"{base}/{REPORTS_FOLDER}/{snapshot_id}.json"
    store.put_json(
        report_key,
        {
            "snapshot_id": snapshot_id,
            "batch_id": verdict.batch_id,
            "reasons": verdict.failures,
            "validation_result": verdict.result,
        },
    )
    html_key = None
    if verdict.html is not None:
        html_key = f"{base}/{REPORTS_FOLDER}/{snapshot_id}.html"
        store.put_file(html_key, verdict.html, "text/html")
    raw_batch = f"{RAW}/{settings.dataset}/{verdict.batch_id}/"
    moved = []
    for obj in manifest["objects"]:
        if obj["batch_id"] != verdict.batch_id:
            continue
        relative = obj["key"].removeprefix(raw_batch)
        if relative.split("/", 1)[0] == REPORTS_FOLDER:
            # _validation/ holds our reports, which ct_reports serves to Airflow users: an uploaded
            # file never lands there (nor overwrites a report), it keeps its path under _uploaded/
            relative = f"_uploaded/{relative}"
        destination = f"{base}/{relative}"
        store.move(obj["key"], destination)
        moved.append(destination)
    log.warning(
        "batch %s quarantined: %d files -> s3://%s/%s/ (report %s)",
        verdict.batch_id,
        len(moved),
        store.bucket,
        base,
        report_key,
    )
    docs_page = f"{docs_prefix}/{verdict.html.relative_to(docs_dir).as_posix()}" if verdict.html else None
    return {
        "batch_id": verdict.batch_id,
        "reasons": verdict.failures,
        "objects": moved,
        "report": report_key,
        "report_html": html_key,
        "data_docs_page": settings.report_link(docs_page) if docs_page else None,
    }


def _canonical(settings: Settings, frame: pd.DataFrame, batch_id: str) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "text": frame[settings.text_column].astype(str),
            "label": frame[settings.label_column].astype(str),
            "_batch_id": batch_id,
        }
    )
    for column in ("_source_key", "_source_row"):
        if column in frame.columns:
            out[column] = frame[column].to_numpy()
    return out
