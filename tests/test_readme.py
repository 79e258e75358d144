"""The README tells the truth: its schema table is the code's schema, its set-up commands are what CI runs."""

from __future__ import annotations

from eagle.io.schema import markdown_table


def test_readme_schema_matches_code(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the README schema table with `python -m eagle.io.schema`"


def test_ci_runs_readme_commands(repo_root):
    readme = (repo_root / "README.md").read_text()
    ci = (repo_root / ".ci" / "run").read_text()
    for cmd in ("pip install --require-hashes -r requirements-dev.lock", "pip install --no-deps -e ."):
        assert cmd in readme and cmd.replace("pip install", "pip install --quiet") in ci, cmd
    assert "python -m pytest" in readme and "\npython -m pytest\n" in ci
