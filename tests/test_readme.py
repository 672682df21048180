"""Every python block of README.md runs as written (each in a fresh interpreter, in a scratch folder); blocks
fenced ```py need files that a run makes and are shown only. The README stays short (the rest lives in
docs/, whose blocks tests/test_docs_pages.py runs), its two fresh-machine commands are the ones CI runs, and
its links to the docs pages resolve."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)
MAIN_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install -U pip setuptools wheel && pip install '
                'torch==2.14.1 && pip install --no-build-isolation -e ".[train]" && python -m mlkd_fast.train')
TEST_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install -U pip setuptools wheel && pip install '
                'torch==2.14.1 && pip install --no-build-isolation -e ".[test]" && python -m pytest')


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


def test_the_readme_is_short():
    assert len(TEXT.splitlines()) <= 200


def test_the_two_commands_are_the_ones_ci_runs():
    bash = re.findall(r"^```bash\n(.*?)^```", TEXT, flags=re.S | re.M)
    assert f"{MAIN_COMMAND}\n" in bash and f"{TEST_COMMAND}\n" in bash
    assert f"\n{TEST_COMMAND}\n" in (ROOT / ".ci" / "run").read_text()


def test_the_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT):
        if "://" not in target:
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, f"README python block {index} failed:\n{BLOCKS[index]}\n{run.stdout}\n{run.stderr}"
