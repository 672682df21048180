"""Every ```python block of the documentation pages (docs/*.md) runs as written, each in a fresh interpreter
in a scratch folder, as README.md's do (tests/test_readme.py). Blocks fenced ```py are shown only: they need
files that a run makes (an exported student). docs/lm.md has its own test (tests/test_docs_lm.py: its
Hugging Face blocks need the lm extra), and a block that README.md also holds runs once, there.

Also: the pages named in mkdocs.yml's nav exist, every docs page is in the nav, the generated sections
live in the pages (not in the README), and the zoo's block exercises every registered method."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

import mlkd_fast.methods as M

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
OWN_TEST = {"lm.md"}  # tests/test_docs_lm.py
README_BLOCKS = set(FENCE.findall((ROOT / "README.md").read_text()))
BLOCKS = [(page.name, i, block) for page in sorted(DOCS.glob("*.md")) if page.name not in OWN_TEST
          for i, block in enumerate(FENCE.findall(page.read_text())) if block not in README_BLOCKS]


def test_the_pages_have_python_blocks():
    pages = {name for name, _, _ in BLOCKS}
    assert {"loss.md", "zoo.md", "benchmarks.md"} <= pages, pages


@pytest.mark.parametrize("page, index", [(name, i) for name, i, _ in BLOCKS], ids=lambda v: str(v))
def test_docs_block_runs(page, index, tmp_path):
    block = next(b for name, i, b in BLOCKS if (name, i) == (page, index))
    script = tmp_path / f"block{index}.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, f"docs/{page} python block {index} failed:\n{block}\n{run.stdout}\n{run.stderr}"
    if "methods.available()" in block:
        printed = {line.split()[0] for line in run.stdout.splitlines() if line.strip()}
        assert set(M.available()) <= printed, f"the zoo block did not run {set(M.available()) - printed}"


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    return re.findall(r"^\s+- [^\n]*?:\s*([\w.-]+\.md)\s*$", nav, flags=re.M)


def test_the_nav_names_every_page_and_only_pages_that_exist():
    nav = _nav_pages()
    assert len(nav) == len(set(nav))
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))


@pytest.mark.parametrize("marker, page", [("bench", "benchmarks.md"), ("bench-lm", "benchmarks.md"),
                                          ("cache", "cache.md"), ("kdbc", "study.md"), ("lm-demo", "lm.md")])
def test_generated_sections_live_in_the_docs(marker, page):
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = (DOCS / page).read_text()
    assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)
    assert start not in (ROOT / "README.md").read_text()
