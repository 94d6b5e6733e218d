"""benchmarks/train_overhead.py's bookkeeping: run order, per-run rows and the Ray ÷ bare ratios.

The benchmark itself (minutes of training on two paths) is not run here.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    folder = str(REPO_ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        import train_overhead

        yield train_overhead
    finally:
        sys.path.remove(folder)


def _rank(rank: int, start: float, loop_s: list[float], steps: list[list[float]], samples: int = 16):
    epochs = []
    for epoch, (seconds, step_s) in enumerate(zip(loop_s, steps, strict=True), start=1):
        begin = start + 100 * (epoch - 1)
        epochs.append(
            {
                "epoch": epoch,
                "start": begin,
                "end": begin + seconds,
                "loop_s": seconds,
                "step_s": step_s,
                "samples": samples,
                "train_loss": 1.0 + rank,
                "threads": 1,
            }
        )
    return {"rank": rank, "entered": start - 5, "left": start + 200, "epochs": epochs, "peak_rss_mb": 1000.0}


def test_the_order_alternates_so_drift_weighs_on_both(bench):
    assert bench.schedule(1) == [(1, "ray"), (1, "bare")]
    assert bench.schedule(3) == [(1, "ray"), (1, "bare"), (2, "bare"), (2, "ray"), (3, "ray"), (3, "bare")]


def test_a_run_is_paced_by_its_slowest_rank(bench):
    ranks = [
        _rank(0, 1010.0, [4.0, 5.0], [[1.0, 3.0], [2.0, 3.0]]),
        _rank(1, 1011.0, [5.0, 4.5], [[2.0, 3.0], [1.0, 3.5]]),
    ]
    row = bench.summarise_run(ranks, started=1000.0, ended=1130.0)
    assert row["loop_s"] == 9.5  # rank 1: 5 + 4.5, against rank 0's 4 + 5
    assert row["samples"] == 64
    assert row["samples_per_s"] == pytest.approx(64 / 9.5)
    assert row["steps_per_rank"] == 4
    assert row["step_ms_median"] == pytest.approx(2500)  # slowest per step: 2, 3, 2, 3.5
    assert row["end_to_end_s"] == 130.0
    assert row["to_first_step_s"] == 11.0  # the later rank's first step
    assert row["after_loop_s"] == pytest.approx(130.0 - (111.0 + 4.5))
    assert row["after_loop_in_workers_s"] == pytest.approx(1211.0 - (1111.0 + 4.5))
    assert row["worker_entered_s"] == 6.0
    assert row["train_loss"] == 1.5


def _run(round_: int, path: str, loop_s: float, end_to_end_s: float) -> dict:
    return {
        "round": round_,
        "path": path,
        "loop_s": loop_s,
        "end_to_end_s": end_to_end_s,
        "samples_per_s": 400 / loop_s,
        "samples": 400,
        "steps_per_rank": 13,
    }


def test_ratios_of_the_means_and_per_round(bench):
    runs = [
        _run(1, "ray", 22.0, 90.0),
        _run(1, "bare", 20.0, 45.0),
        _run(2, "bare", 24.0, 55.0),
        _run(2, "ray", 24.0, 100.0),
    ]
    summary = bench.compare(runs, goal=1.15)
    assert summary["loop_ratio"] == pytest.approx(23.0 / 22.0)
    assert summary["end_to_end_ratio"] == pytest.approx(95.0 / 50.0)
    assert [p["loop_ratio"] for p in summary["per_round"]] == pytest.approx([1.1, 1.0])
    assert summary["goal_met"] and summary["same_work"]
    assert "met" in summary["verdict"]
    assert "loop time ray/bare 1.045" in bench.format_summary(summary)


def test_a_missed_goal_and_unequal_work_are_said(bench):
    runs = [_run(1, "ray", 30.0, 90.0), _run(1, "bare", 20.0, 45.0) | {"samples": 384}]
    summary = bench.compare(runs, goal=1.15)
    assert not summary["goal_met"]
    assert "MISSED" in summary["verdict"] and "did not do the same work" in summary["verdict"]


def test_failed_runs_leave_no_ratio(bench):
    runs = [_run(1, "ray", 30.0, 90.0), {"round": 1, "path": "bare", "error": "RuntimeError('x')"}]
    summary = bench.compare(runs)
    assert "loop_ratio" not in summary
    assert summary["verdict"].startswith("no result")
    assert "failed: RuntimeError('x')" in bench.format_table(runs[1:])
