"""The dependency lock: pyproject.toml and the lock files agree, and a disagreement fails with a clear message."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LOCKS = ("pyproject.toml", "requirements.lock", "requirements-dev.lock")


def _check(root: Path, repo_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(repo_root / "infra" / "lock.py"), "check",
                           "--pyproject", str(root / "pyproject.toml")], capture_output=True, text=True)


@pytest.fixture()
def project_copy(tmp_path: Path, repo_root: Path) -> Path:
    for name in LOCKS:
        shutil.copy(repo_root / name, tmp_path / name)
    return tmp_path


def test_repository_lock_matches_pyproject(repo_root: Path):
    proc = _check(repo_root, repo_root)
    assert proc.returncode == 0, proc.stderr
    assert "check ok" in proc.stdout


def test_dependency_missing_from_lock_fails_with_a_clear_message(project_copy: Path, repo_root: Path):
    pyproject = project_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('  "duckdb>=1.2",\n', '  "duckdb>=1.2",\n  "polars>=1.0",\n'))
    proc = _check(project_copy, repo_root)
    assert proc.returncode == 1
    assert "polars>=1.0 is required by pyproject.toml but not in requirements-dev.lock" in proc.stderr
    assert "polars>=1.0 is required by pyproject.toml but not in requirements.lock" in proc.stderr
    assert "python infra/lock.py refresh" in proc.stderr  # says how to fix it


def test_locked_version_outside_the_range_fails(project_copy: Path, repo_root: Path):
    pyproject = project_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"duckdb>=1.2"', '"duckdb<1.0"'))
    proc = _check(project_copy, repo_root)
    assert proc.returncode == 1 and "duckdb<1.0 is required by pyproject.toml but requirements-dev.lock has duckdb==" \
        in proc.stderr


def test_runtime_and_dev_locks_pin_the_same_versions(project_copy: Path, repo_root: Path):
    runtime = project_copy / "requirements.lock"
    text = runtime.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("pyyaml=="))
    runtime.write_text(text.replace(line, "pyyaml==0.0.1 \\"))
    proc = _check(project_copy, repo_root)
    assert proc.returncode == 1 and "pyyaml: requirements.lock has 0.0.1, requirements-dev.lock has" in proc.stderr


def test_installed_reports_a_version_that_differs_from_the_lock(tmp_path: Path, repo_root: Path):
    import pytest as installed_pytest

    lock = tmp_path / "x.lock"
    lock.write_text("pytest==0.0.1 \\\n    --hash=sha256:00\nnot-installed-pkg==1.0\n")
    proc = subprocess.run([sys.executable, str(repo_root / "infra" / "lock.py"), "installed", "--lock", str(lock)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"pytest: locked 0.0.1, installed {installed_pytest.__version__}" in proc.stderr
    assert "not-installed-pkg: locked 1.0, installed -" in proc.stderr
