"""Every python block of docs/lm.md runs as written, each in a fresh interpreter in a scratch folder.
A block that imports transformers runs only where transformers is importable (it is not a test
dependency); elsewhere it skips, saying so."""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "lm.md").read_text(), flags=re.S | re.M)


def test_the_page_has_python_blocks():
    assert len(BLOCKS) >= 5
    assert any("transformers" in block for block in BLOCKS)  # the Hugging Face example


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_lm_block_runs(index, tmp_path):
    block = BLOCKS[index]
    if re.search(r"^\s*(from|import) transformers\b", block, flags=re.M) and \
            importlib.util.find_spec("transformers") is None:
        pytest.skip("this block needs transformers (pip install transformers), which is not installed")
    # the checkout on the path, as an editable install has it (its Triton kernels live inside the package,
    # so nothing at the root shadows a package that transformers imports)
    script = tmp_path / f"block{index}.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, f"docs/lm.md python block {index} failed:\n{block}\n{run.stdout}\n{run.stderr[-6000:]}"
