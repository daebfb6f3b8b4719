"""The front door and the manual: README.md is one screen whose links resolve, and the docs site builds with
`mkdocs build --strict` (a broken link, a page missing from the nav or a marker naming an unknown method fails)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_readme_is_short_and_every_relative_link_in_it_resolves():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) + re.findall(r'src="([^"]+)"', text)
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert local, "the README links to no page of the docs"
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]'; .ci/run installs it)")
def test_the_docs_site_builds_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    proc = subprocess.run([str(mkdocs if mkdocs.exists() else "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (tmp_path / "configuration" / "index.html").read_text()
    assert "train.stop_collapsed" in page and "distill:config-reference" not in page   # the generated reference
    scmd = (tmp_path / "methods" / "scmd" / "index.html").read_text()
    assert "selection_ratio" in scmd and "distill:hparams" not in scmd
    irm = (tmp_path / "methods" / "irm" / "index.html").read_text()   # the page is the module's own docstring
    assert "distill:method-doc" not in irm and "irm_penalty_anneal_iters" in irm and "hparams_registry.py" in irm
    from distill.methods import REGISTRY

    nav = (REPO / "mkdocs.yml").read_text()
    documented = set()
    for page in (REPO / "docs" / "methods").glob("*.md"):
        documented |= set(re.findall(r"<!-- distill:hparams (\w+) -->", page.read_text()))
        assert page.name == "index.md" or f"methods/{page.name}" in nav, page
    assert documented == set(REGISTRY)   # every registered method has its page and its hyperparameter table


def test_the_readme_shows_the_table_the_demo_printed():
    """The README's demo table is the one a run of the demo wrote (docs/evidence/demo/results.md, copied from a
    fresh clone's distill_runs/demo/), and that run swept the methods demo.yaml sweeps now: changing the demo without
    running it again and refreshing the record fails here."""
    import yaml

    record = (REPO / "docs" / "evidence" / "demo" / "results.md").read_text()
    main_table = record.split("**Training-domain validation**", 1)[1].split("**", 1)[0]
    for page, start, end in (("README.md", "## What you will see", "\n## "),
                             ("docs/getting-started.md", "Held-out accuracy, seed 0", "\n### ")):
        section = (REPO / page).read_text().split(start, 1)[1].split(end, 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) >= 4, (page, section)
        missing = [row for row in rows if row not in main_table.splitlines()]
        assert not missing, f"{page}: rows not in the recorded demo's main table: {missing}"
    space = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())["search"]["space"]
    methods = space["method.name"]["choice"]
    recorded = [line.split(" | ")[0].removeprefix("| ") for line in main_table.splitlines() if line.startswith("| ")]
    assert [m for m in recorded if m in methods] == methods, (recorded, methods)


def _table(text: str, header_start: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table whose header row starts with header_start: (headers, first cell -> cells)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]   # noqa: E731
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows[cells(line)[0]] = cells(line)
    return cells(lines[start]), rows


def test_the_readme_comparison_is_the_evidence_table():
    """The README's fixed/tuned comparison is docs/evidence/tuned/fixed-vs-tuned.md (written by summary.py from
    the reports), column for column and row for row: a number typed by hand, or left behind by a later run, fails."""
    headers, readme = _table((REPO / "README.md").read_text(), "| method | fixed Avg")
    full_headers, evidence = _table((REPO / "docs/evidence/tuned/fixed-vs-tuned.md").read_text(), "| method |")
    assert list(readme) == list(evidence)
    columns = [full_headers.index(h) for h in headers]
    for method, cells in readme.items():
        assert cells == [evidence[method][i] for i in columns], method


def test_the_evidence_page_shows_every_landed_tuned_row():
    """docs/evidence.md's tuned table is fixed-vs-tuned.md without the rows that have not run yet, cell for cell (it
    had once left out a row that had landed)."""
    full_headers, evidence = _table((REPO / "docs/evidence/tuned/fixed-vs-tuned.md").read_text(), "| method |")
    headers, page = _table((REPO / "docs/evidence.md").read_text(), "| method | fixed Avg")
    assert headers == full_headers
    assert page == {m: cells for m, cells in evidence.items() if cells[3] != "not run yet"}
