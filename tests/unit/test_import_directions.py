"""Import directions: the pipeline (``dags/``, ``ml/``, ``plugins/``) imports nothing from ``serve/``.

``serve/`` holds only the Ray Serve application and its HTTP contract; it may use ``ml/`` (the
prediction log, settings, the model loader). The deploy, smoke test, rollback and the prediction
log's schema and reader are pipeline logic in ``ml/``. Any import of ``serve`` or ``serve.*`` from
the pipeline, at module level or inside a function, fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PIPELINE = ("dags", "ml", "plugins")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _from_serve(module: str) -> bool:
    return module == "serve" or module.startswith("serve.")


@pytest.mark.parametrize("package", PIPELINE)
def test_pipeline_imports_nothing_from_serve(package: str) -> None:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{line}: import {module}"
        for path in files
        for line, module in _imports(path)
        if _from_serve(module)
    ]
    assert not offending, "the pipeline must not import serve/:\n" + "\n".join(offending)


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    """The walk finds imports inside functions too (where the DAG tasks import)."""
    source = tmp_path / "task.py"
    source.write_text("def task():\n    from serve.app import Classifier\n    import serve.schemas\n")
    assert [m for _, m in _imports(source) if _from_serve(m)] == ["serve.app", "serve.schemas"]
    assert not _from_serve("serverless") and not _from_serve("ray.serve")
