"""The package's import graph: a DAG with the op contract at the bottom and the kernels above it only, each module importable alone."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_files() -> dict[str, Path]:
    """Every module of the package, its subpackages (the zoo, the loop) included."""
    files = {}
    for p in (ROOT / "mlkd_fast").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if p.stem == "__init__" else parts)] = p
    return files


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file, lazy imports included)."""
    files = _module_files()
    graph = {}
    for module, path in files.items():
        package = module if path.stem == "__init__" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                for alias in node.names:
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[module] = {e for e in edges if e in files and e != module}
    return graph


def test_import_graph_is_a_dag():
    graph = _import_graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    # the layering: the op contract and the token divergences' math import nothing of the package; the
    # kernels only those two (a kernel's fallback for what it leaves out is the divergences' torch code)
    assert graph["mlkd_fast.ops"] == set()
    assert graph["mlkd_fast.divergences"] == set()
    assert graph["mlkd_fast.kernels"] <= {"mlkd_fast.kernels.kd_kl", "mlkd_fast.kernels.correlation",
                                          "mlkd_fast.kernels._device"}
    for module, deps in graph.items():
        if module.startswith("mlkd_fast.kernels"):
            assert {d for d in deps if not d.startswith("mlkd_fast.kernels")} <= {"mlkd_fast.ops",
                                                                                  "mlkd_fast.divergences"}, module


# the trainer's command line and run: what the teacher-cache writer must not sit above (#35)
TRAINER = {"mlkd_fast.train.cli", "mlkd_fast.train.run"}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_cache_writer_does_not_import_the_trainer():
    """The teacher-cache writer (``mlkd_fast.train.cache*``) builds its data and teacher from the
    shared pieces (``training_data``, ``placement``, ``models``), never through the trainer's
    command line or run: no module of it reaches ``cli.py`` or ``run.py``, directly or not."""
    graph = _import_graph()
    cache = [m for m in graph if m == "mlkd_fast.train.cache" or m.startswith("mlkd_fast.train.cache.")]
    assert cache, "no cache writer modules found"
    reaching = {m: sorted(_reachable(graph, m) & TRAINER) for m in cache}
    assert not {m: t for m, t in reaching.items() if t}, reaching


_IMPORT_EACH = """
import os, sys
import torch  # preloaded once; each module is then imported alone in a forked child
try:
    import triton  # noqa: F401
except Exception:
    pass
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException as exc:
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
def test_each_module_imports_alone():
    modules = sorted(_module_files())
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_trainer_imports_no_private_name_of_the_zoo():
    """mlkd_fast.train reads the zoo (mlkd_fast.methods) through its public names only (models.py: the
    classifier finder is taps.find_classifier; _find_classifier stays an alias for older callers)."""
    from mlkd_fast.methods import taps

    assert taps._find_classifier is taps.find_classifier
    private = []
    for path in (ROOT / "mlkd_fast" / "train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "methods" in (node.module or "").split("."):
                private += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private
