"""The README and docs/ tell the truth: the README is a landing page whose set-up commands are what CI runs and
whose exit codes are the jobs'; the schema table in docs/OUTPUT.md is the code's schema; every relative link
resolves; the SQL and YAML examples of the README and docs/ run."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pytest

from eagle.cli.exit_codes import EXIT_CODES
from eagle.config import load_config
from eagle.io.schema import markdown_table, to_table

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _pages(repo_root: Path) -> list[Path]:
    return [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md"))]


def _blocks(path: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def test_output_schema_table_matches_code(repo_root):
    output = (repo_root / "docs" / "OUTPUT.md").read_text()
    assert markdown_table() in output, "regenerate the schema table in docs/OUTPUT.md with `python -m eagle.io.schema`"


def test_ci_runs_readme_commands(repo_root):
    readme = (repo_root / "README.md").read_text()
    ci = (repo_root / ".ci" / "run").read_text()
    for cmd in ("pip install --require-hashes -r requirements-dev.lock", "pip install --no-deps -e ."):
        assert cmd in readme and cmd.replace("pip install", "pip install --quiet") in ci, cmd
    assert "python -m pytest" in readme and "\npython -m pytest\n" in ci


def test_readme_is_a_landing_page(repo_root):
    lines = (repo_root / "README.md").read_text().splitlines()
    assert 120 <= len(lines) <= 220, f"README.md has {len(lines)} lines: keep it a landing page, details in docs/"


def test_readme_exit_codes_in_brief_are_the_jobs(repo_root):
    """The README's brief table: one row per exit code, naming exactly the jobs that use it."""
    readme = (repo_root / "README.md").read_text()
    section = readme[readme.index("\n## Exit codes"):]
    section = section[:section.find("\n## ", 1)]
    rows = {int(m[1]): {j.strip() for j in m[2].split(",")}
            for m in re.finditer(r"^\| (\d+) \| ([a-z, ]+) \|", section, re.M)}
    expected: dict[int, set[str]] = {}
    for job, codes in EXIT_CODES.items():
        for code in codes:
            expected.setdefault(code, set()).add(job)
    assert rows == expected


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = _slug(m[1])
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_resolves(repo_root):
    broken = []
    for page in _pages(repo_root):
        text = FENCE.sub("", page.read_text())
        text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s)://, mailto: — not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(repo_root)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(repo_root)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _audit_rows() -> list[dict]:
    at = datetime(2026, 11, 2, 2, 0, tzinfo=UTC)
    rows = [("nut", "ok", "anomalous"), ("nut", "ok", "normal"), ("nut", "ok", "normal"),
            ("grid", "ok", "normal"), ("grid", "error", None)]
    return [{"run_id": "r1", "audited_at": at, "image_uri": f"/data/{product}/{i}.png", "product": product,
             "status": status, "verdict": verdict, "audit_date": "2026-11-02",
             "error": "cannot decode" if status == "error" else None}
            for i, (product, status, verdict) in enumerate(rows)]


@pytest.mark.parametrize("page", ["README.md", "docs/OUTPUT.md"])
def test_sql_examples_run_on_an_output(page, repo_root, tmp_path, monkeypatch):
    """The DuckDB queries of the page, over an output laid out as the job writes it (Hive-partitioned Parquet
    under ./audit)."""
    pads.write_dataset(to_table(_audit_rows()), base_dir=tmp_path / "audit", format="parquet",
                       partitioning=["product", "audit_date"], partitioning_flavor="hive")
    monkeypatch.chdir(tmp_path)
    queries = _blocks(repo_root / page, "sql")
    assert queries, f"{page} has no sql example"
    for sql in queries:
        got = duckdb.sql(sql).fetchall()
        assert got == [("grid", "normal", 1), ("nut", "anomalous", 1), ("nut", "normal", 2)], sql


@pytest.mark.parametrize("page", ["docs/OPERATIONS.md", "docs/ICEBERG.md"])
def test_yaml_examples_are_valid_configs(page, repo_root, tmp_path):
    examples = _blocks(repo_root / page, "yaml")
    assert examples, f"{page} has no yaml example"
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(example)
        load_config(path, env={})  # raises ConfigError naming the key that is wrong


def _job_commands(repo_root: Path) -> dict[str, list[str]]:
    """Every `python jobs/NAME.py ...` command line in a bash example of the README or docs/, by job."""
    found: dict[str, list[str]] = {}
    for page in _pages(repo_root):
        for block in _blocks(page, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s#.*", "", line)
                for m in re.finditer(r"python jobs/(\w+)\.py([^'&;]*)", line):
                    found.setdefault(m[1], []).append(m[2])
    return found


def test_job_examples_use_options_the_jobs_have(repo_root, capsys, monkeypatch):
    """A flag in an example that the job does not know (renamed, removed) fails here, not in a user's shell."""
    import importlib

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # inspect's main sets it
    commands = _job_commands(repo_root)
    assert {"inspect", "fit", "evaluate"} <= commands.keys(), commands.keys()
    unknown = []
    for job, lines in commands.items():
        with pytest.raises(SystemExit):
            importlib.import_module(f"eagle.cli.{job}_cmd").main(["--help"])
        help_text = capsys.readouterr().out
        unknown += [f"jobs/{job}.py {flag}" for line in lines for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)
                    if not re.search(rf"{flag}\b(?!-)", help_text)]
    assert not unknown, unknown
