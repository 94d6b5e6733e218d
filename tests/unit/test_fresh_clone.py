"""A plain clone runs what reads data with nothing beside it: no ``../shared``.

The clone test copies the files git tracks (plus new files that git does not ignore) into
``<tmp>/clone``, where nothing named ``shared`` lies beside it. There, with this checkout's venv,
it runs the preflight, ``python -m ml.seed --dry-run`` (which reads the seed data and cuts the
batches), the demo's data loading, and the data-reading tests of ``tests/unit``. The preflight's
checks and its hook in ``stack.up`` are tested here too.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ml.sample_data import AGNEWS_SAMPLE, NEWSGROUPS_SAMPLE, SAMPLE_DATA_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import preflight  # noqa: E402

# Files that may name ../shared/data: it is where the samples were cut from (the script that
# rebuilds them, the docs that say so) and where benchmark runs read before data/ existed.
MAY_NAME_SHARED = re.compile(
    r"^(data/|docs/|README\.md$|benchmarks/README\.md$|benchmarks/results/"
    r"|scripts/make_sample_data\.py$|tests/unit/test_fresh_clone\.py$)"
)
SHARED_DATA = re.compile(r"""shared["']?\s*[/,]\s*["']?data""")  # shared/data, "shared" / "data"


def _repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (REPO_ROOT / name).is_file()]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fresh") / "clone"
    for name in _repo_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    assert not (root.parent / "shared").exists()
    return root


def _run(clone: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``argv`` in the clone with this venv's python; imports resolve to the clone's code."""
    env = {**os.environ, "PYTHONPATH": str(clone), "CT_STATE_DIR": str(clone / ".state")}
    return subprocess.run(
        [sys.executable, *argv], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_clone_imports_its_own_code(clone):
    done = _run(clone, "-c", "import ml.sample_data as m, ml.seed as s; print(m.__file__); print(s.__file__)")
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(str(clone)) for line in done.stdout.split()), done.stdout


def test_preflight_passes_in_the_clone(clone):
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import preflight\n"
        "problems = preflight.run({}, preflight.REPO_ROOT / '.state', min_free_gb=0.1)\n"
        "print(preflight.describe(problems) if problems else 'preflight ok'); sys.exit(bool(problems))"
    )
    done = _run(clone, "-c", code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "preflight ok" in done.stdout


def test_seed_reads_and_cuts_the_shipped_data(clone):
    done = _run(clone, "-m", "ml.seed", "--dry-run", "--rows", "5000", "--bad-batch")
    assert done.returncode == 0, done.stderr
    assert str(clone / "data" / "agnews_5600.csv.gz") in done.stdout
    uploads = [line for line in done.stdout.splitlines() if line.startswith("would upload")]
    assert len(uploads) == 5, done.stdout  # four daily batches and the bad one
    assert sum(int(re.search(r": (\d+) rows", line)[1]) for line in uploads[:4]) == 5000


def test_the_demo_loads_its_data(clone):
    """What the demo reads: AG News (5,000 seeded, 600 held back for act 2) and the posts it sends."""
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import demo, pandas as pd\n"
        "held = demo.held_back_rows()\n"
        "news = pd.read_csv(demo.NEWSGROUPS_SAMPLE)\n"
        "news = news[news['text'].str.strip().str.len().between(20, 3000)]\n"
        "texts = news.sample(demo.DRIFT_TEXTS, random_state=5)['text'].tolist()\n"
        "print(demo.DEFAULT_SOURCE, demo.NEWSGROUPS_SAMPLE, len(held), len(texts))"
    )
    done = _run(clone, "-c", code)
    assert done.returncode == 0, done.stderr
    agnews, news, held, texts = done.stdout.split()
    assert agnews.startswith(str(clone)) and news.startswith(str(clone))
    assert (int(held), int(texts)) == (600, 300)


def test_data_reading_unit_tests_pass_in_the_clone(clone):
    # the drift check against 20 Newsgroups posts, and seeding from the AG News fixture
    done = _run(
        clone,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "tests/unit/test_drift.py::test_another_source_is_text_drift",
        "tests/unit/test_seed_as_producer.py",
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b3 passed\b", done.stdout), done.stdout[-2000:]


def test_no_file_needs_shared_data():
    offenders = [
        name
        for name in _repo_files()
        if not MAY_NAME_SHARED.match(name)
        and SHARED_DATA.search((REPO_ROOT / name).read_text(errors="replace"))
    ]
    assert not offenders, f"these files name ../shared/data; read data/ (ml/sample_data.py): {offenders}"


def test_the_pattern_finds_both_spellings():
    assert SHARED_DATA.search('REPO_ROOT.parent / "shared" / "data" / "agnews_5600.csv.gz"')
    assert SHARED_DATA.search("../shared/data/20newsgroups_test.csv.gz")
    assert not SHARED_DATA.search("shared batches of data")


def test_samples_are_big_enough_for_their_readers():
    assert SAMPLE_DATA_DIR == REPO_ROOT / "data"
    agnews = pd.read_csv(AGNEWS_SAMPLE)
    assert list(agnews.columns) == ["text", "label"]
    assert agnews["label"].value_counts().to_dict() == dict.fromkeys(
        ["Business", "Sci_Tech", "Sports", "World"], 1400
    )
    news = pd.read_csv(NEWSGROUPS_SAMPLE)
    assert list(news.columns) == ["text", "label"] and news["label"].nunique() == 20
    # tests/integration/test_stack_and_dag.py sends 400 posts of 20-3,000 characters (the demo 300)
    assert news["text"].str.strip().str.len().between(20, 3000).sum() >= 400


# --- the preflight's checks, each able to fail -------------------------------------------------


def test_missing_data_is_named():
    missing = SAMPLE_DATA_DIR / "no-such-sample.csv.gz"
    problems = preflight.check_data([AGNEWS_SAMPLE, missing])
    assert len(problems) == 1 and str(missing) in problems[0].what
    assert "data/README.md" in problems[0].fix


@pytest.mark.parametrize(
    ("version", "ok"), [((3, 11, 9), True), ((3, 12, 3), True), ((3, 10, 14), False), ((3, 13, 0), False)]
)
def test_python_versions(version, ok):
    problems = preflight.check_python(version)
    assert (not problems) == ok
    if not ok:
        assert "3.11 or 3.12" in problems[0].what and "PYTHON=python3.12" in problems[0].fix


def test_a_taken_port_is_named_with_its_owner():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        problems = preflight.check_ports({port: "mlflow"})
    assert len(problems) == 1
    assert f"port {port} (mlflow) is in use" in problems[0].what
    assert preflight.check_ports({port: "mlflow"}) == []  # released


def test_too_little_disk_is_named(tmp_path):
    assert preflight.check_disk([tmp_path], min_free_gb=0.001) == []
    problems = preflight.check_disk([tmp_path / "not" / "yet"], min_free_gb=1e9)
    assert len(problems) == 1 and "GB free" in problems[0].what


def test_every_problem_is_reported_at_once():
    problems = [*preflight.check_python((3, 10, 0)), *preflight.check_data([SAMPLE_DATA_DIR / "gone.csv.gz"])]
    message = preflight.describe(problems)
    assert message.startswith("preflight: 2 problem(s)") and "3.10.0" in message and "gone.csv.gz" in message


def test_stack_up_stops_before_any_service_on_a_failed_check(monkeypatch):
    import stack

    problem = preflight.Problem("sample data data/x.csv.gz is missing", "restore it")
    monkeypatch.setattr(stack.preflight, "run", lambda ports, state_dir: [problem])
    monkeypatch.setattr(stack, "_start", lambda s, svc: pytest.fail(f"{svc.name} started"))
    with pytest.raises(stack.StackError, match=r"data/x\.csv\.gz is missing"):
        stack.up(["s3"])
