"""Every python block of README.md runs as written (each in a fresh interpreter, in a scratch folder),
and the zoo's block exercises every registered method."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

import mlkd_fast.methods as M

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, f"README python block {index} failed:\n{BLOCKS[index]}\n{run.stdout}\n{run.stderr}"
    if "methods.available()" in BLOCKS[index]:
        printed = {line.split()[0] for line in run.stdout.splitlines() if line.strip()}
        assert set(M.available()) <= printed, f"the zoo block did not run {set(M.available()) - printed}"
