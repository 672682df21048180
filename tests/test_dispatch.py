"""The dispatch and autograd layers themselves (docs/design.md §3): the op table and the compiled
library's schemas, the import graph, the backend registry and its per-call resolution, the fakes, and
the autograd glue of the fused KL."""
import ast
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_backend
from mlkd_fast import _native, backends, functional as MF, ops, reference
from mlkd_fast.backends import ENV_VAR, REGISTRY, BackendStatus

ROOT = Path(__file__).resolve().parents[1]
FUSED = {"native": ops.NATIVE_NAMESPACE, "triton": ops.TRITON_NAMESPACE}


# ---------------------------------------------------------------------------------------------
# the op table
# ---------------------------------------------------------------------------------------------
def _namespace_ops(namespace: str) -> set[str]:
    prefix = f"{namespace}::"
    return {n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_compiled_kernels_sit_under_the_table_schemas(name):
    """csrc/ declares no schema: its kernels are registered under those of mlkd_fast.ops.SCHEMAS."""
    if not _native.LOADED:
        pytest.skip(f"the compiled library is not loaded: {_native.LOAD_ERROR}")
    schema = str(getattr(torch.ops.mlkd_fast, name).default._schema)
    assert schema == f"{ops.NATIVE_NAMESPACE}::{ops.SCHEMAS[name]}"
    qualname = f"{ops.NATIVE_NAMESPACE}::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA") == _native.has_cuda_kernels()


def test_compiled_library_declares_exactly_the_table():
    if not _native.LOADED:
        pytest.skip(f"the compiled library is not loaded: {_native.LOAD_ERROR}")
    assert _namespace_ops(ops.NATIVE_NAMESPACE) == set(ops.SCHEMAS)
    assert _namespace_ops("mlkd_fast_build") == {"built_with_cuda"}


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_triton_ops_are_defined_from_the_table(name):
    if backends._triton is None:
        pytest.skip(backends._TRITON_ERROR)
    assert _namespace_ops(ops.TRITON_NAMESPACE) == set(ops.SCHEMAS)
    schema = str(getattr(torch.ops.mlkd_fast_triton, name).default._schema)
    assert schema == f"{ops.TRITON_NAMESPACE}::{ops.SCHEMAS[name]}"


def test_define_ops_needs_every_implementation():
    with pytest.raises(ValueError, match="no implementation for correlation_bwd"):
        ops.define_ops("mlkd_fast_incomplete", {name: None for name in ops.SCHEMAS if name != "correlation_bwd"})


def test_norm_eps_is_defined_once():
    """The reference and the Triton kernels take the normalisation eps from the op contract."""
    if backends._triton is not None:
        from mlkd_fast.kernels import correlation
        assert correlation.NORM_EPS is ops.NORM_EPS
    assert reference.NORM_EPS is ops.NORM_EPS
    sources = [p for p in (ROOT / "mlkd_fast").glob("*.py")] + list((ROOT / "kernels").glob("*.py"))
    defining = [p.name for p in sources if "NORM_EPS = " in p.read_text()]
    assert defining == ["ops.py"]


# ---------------------------------------------------------------------------------------------
# the import graph
# ---------------------------------------------------------------------------------------------
def _module_files() -> dict[str, Path]:
    files = {("mlkd_fast" if p.stem == "__init__" else f"mlkd_fast.{p.stem}"): p
             for p in (ROOT / "mlkd_fast").glob("*.py")}
    files.update({("mlkd_fast.kernels" if p.stem == "__init__" else f"mlkd_fast.kernels.{p.stem}"): p
                  for p in (ROOT / "kernels").glob("*.py")})
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
    # the layering: the op contract imports nothing of the package; the kernels only the contract
    assert graph["mlkd_fast.ops"] == set()
    assert graph["mlkd_fast.kernels"] <= {"mlkd_fast.kernels.kd_kl", "mlkd_fast.kernels.correlation",
                                          "mlkd_fast.kernels._device"}
    for module, deps in graph.items():
        if module.startswith("mlkd_fast.kernels"):
            assert {d for d in deps if not d.startswith("mlkd_fast.kernels")} <= {"mlkd_fast.ops"}, module


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


# ---------------------------------------------------------------------------------------------
# the registry and its resolution
# ---------------------------------------------------------------------------------------------
def _fake_statuses(monkeypatch, available: dict[str, bool]) -> None:
    """Makes each backend report the given availability on every device (reason 'fake: <name>')."""
    for name, up in available.items():
        status = BackendStatus(up, f"fake: {name} {'up' if up else 'down'}")
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], status=lambda device, s=status: s))


@pytest.mark.parametrize("device, available, expected", [
    ("cuda", dict(triton=True, native=True), "triton"),
    ("cuda", dict(triton=False, native=True), "native"),
    ("cuda", dict(triton=False, native=False), "torch"),
    ("cpu", dict(triton=True, native=True), "native"),
    ("cpu", dict(triton=True, native=False), "torch"),
    ("meta", dict(triton=True, native=True), "torch"),
])
def test_auto_resolution_order_per_device(monkeypatch, device, available, expected):
    monkeypatch.delenv(ENV_VAR, raising=False)
    _fake_statuses(monkeypatch, available)
    assert backends.resolve("auto", torch.device(device)) is REGISTRY[expected]


def test_auto_order_ends_with_the_reference_everywhere():
    assert all(order[-1] == "torch" and set(order) <= set(REGISTRY) for order in backends.AUTO_ORDER.values())


@pytest.mark.parametrize("value, expected", [("torch", "torch"), (" Native ", "native"), ("", "native"),
                                             ("auto", "native")])
def test_environment_variable_replaces_auto(monkeypatch, value, expected):
    _fake_statuses(monkeypatch, dict(triton=True, native=True))
    monkeypatch.setenv(ENV_VAR, value)
    assert backends.resolve("auto", torch.device("cpu")).name == expected


def test_explicit_backend_wins_over_the_environment_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "bogus")
    assert backends.resolve("torch", torch.device("cpu")).name == "torch"


def test_environment_variable_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=rf"one of 'auto', 'torch', 'triton', 'native'; got 'bogus' "
                                         rf"\(from the environment variable {ENV_VAR}\)"):
        backends.resolve("auto", torch.device("cpu"))
    _fake_statuses(monkeypatch, dict(native=False))
    monkeypatch.setenv(ENV_VAR, "native")
    with pytest.raises(ValueError, match=rf"backend 'native' \(from the environment variable {ENV_VAR}\) "
                                         r"is not available on cpu: fake: native down"):
        backends.resolve("auto", torch.device("cpu"))


@pytest.mark.parametrize("name", ["triton", "native"])
def test_explicit_backend_that_cannot_run_says_why(monkeypatch, name):
    monkeypatch.delenv(ENV_VAR, raising=False)
    _fake_statuses(monkeypatch, {name: False})
    with pytest.raises(ValueError, match=rf"backend '{name}' is not available on cpu: fake: {name} down"):
        backends.resolve(name, torch.device("cpu"))
    with pytest.raises(ValueError, match=f"fake: {name} down"):
        MF.kd_kl_div(torch.randn(3, 4), torch.randn(3, 4), backend=name)


def test_real_statuses_carry_reasons():
    for device in ("cpu", "meta"):
        for name, status in backends.available_backends(device).items():
            assert isinstance(status.reason, str) and status.reason, (name, device)
    assert not backends.backend_status("native", "meta") and not backends.backend_status("triton", "meta")


def test_bad_backend_arguments():
    with pytest.raises(TypeError, match="backend must be a string"):
        backends.resolve(None, torch.device("cpu"))
    with pytest.raises(ValueError, match="got 'cuda'"):
        backends.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="got 'auto'"):
        backends.backend_status("auto", "cpu")


def test_every_backend_has_the_same_per_row_signatures():
    def positional(fn):
        return len([p for p in inspect.signature(fn).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])

    for entry in REGISTRY.values():
        assert positional(entry.kd_kl_rows) == 4, entry.name
        assert positional(entry.correlation_rows) == 6, entry.name


class _Spy:
    """A backend entry that records its calls and computes with the reference."""

    def __init__(self):
        self.calls = []

    def kd_kl_rows(self, s, t, temperature, row_weight):
        self.calls.append(("kd_kl_rows", s.shape, temperature, row_weight))
        return reference.kd_kl_rows(s, t, temperature, row_weight)

    def correlation_rows(self, a_s, a_t, b_s, b_t, tau, exclude_diagonal):
        self.calls.append(("correlation_rows", a_s.shape, tau, exclude_diagonal))
        return reference.correlation_kl_rows(a_s, a_t, b_s, b_t, tau, exclude_diagonal)


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    spy = _Spy()
    entry = backends.Backend("spy", lambda device: BackendStatus(True, "spy"), spy.kd_kl_rows, spy.correlation_rows)
    monkeypatch.setitem(REGISTRY, "spy", entry)
    resolved = []
    resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda b, d: resolved.append(b) or resolve(b, d))
    spy.resolved = resolved
    return spy


def test_functional_calls_the_resolved_backends_per_row_functions(spy):
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.tensor([True, False, True, True])
    loss = MF.kd_kl_div(s, t, 2.0, row_mask=mask, backend="spy", weight=0.5)
    (name, shape, temperature, row_weight), = spy.calls
    assert (name, shape, temperature) == ("kd_kl_rows", (4, 6), 2.0)
    torch.testing.assert_close(row_weight, torch.tensor([1, 0, 1, 1]) * 0.5 / 3)
    torch.testing.assert_close(loss, MF.kd_kl_div(s, t, 2.0, row_mask=mask, backend="torch", weight=0.5))
    f = torch.randn(5, 3)
    MF.correlation_kl(f, torch.randn(5, 2), tau=0.7, backend="spy")
    MF.correlation_kl(f, torch.randn(5, 2), f, torch.randn(5, 2), keep_diagonal=False, cols_start_with_rows=True,
                      backend="spy")
    MF.correlation_kl(f, torch.randn(5, 2), keep_diagonal=True, backend="spy")
    MF.correlation_kl(f, torch.randn(5, 2), torch.randn(4, 3), torch.randn(4, 2), backend="spy")
    assert [c[3] for c in spy.calls[1:]] == [True, True, False, False]  # exclude_diagonal
    assert spy.resolved == ["spy", "torch", "spy", "spy", "spy", "spy"]  # one resolution per call


def test_each_call_resolves_once_and_reads_the_environment_once(spy, monkeypatch):
    reads = []

    class Environ(dict):
        def get(self, key, default=None):
            reads.append(key)
            return super().get(key, default)

    monkeypatch.setattr(backends.os, "environ", Environ(os.environ, **{ENV_VAR: "spy"}))
    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    MF.kd_kl_div(s, t).backward()
    assert spy.resolved == ["auto"] and reads == [ENV_VAR] and len(spy.calls) == 1
    MF.kd_kl_div(s, t, backend="torch")
    assert reads == [ENV_VAR]  # an explicit backend never reads it
    from mlkd_fast import MLKDLoss
    loss_fn = MLKDLoss()
    loss_fn(torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 3), torch.randn(4, 2), torch.randint(0, 6, (4,)))
    assert spy.resolved == ["auto", "torch", "auto", "auto"] and reads == [ENV_VAR] * 3  # KD, correlation


@pytest.mark.parametrize("name", ["triton", "native"])
def test_fused_per_row_functions_match_the_reference(name):
    require_backend(name, "cpu")
    entry = REGISTRY[name]
    s, t = torch.randn(5, 40), torch.randn(5, 40)
    w = torch.tensor([0.2, 0.0, 1.0, 3.0, 1.0])
    torch.testing.assert_close(entry.kd_kl_rows(s, t, 2.0, w), reference.kd_kl_rows(s, t, 2.0, w))
    a_s, a_t, b_s, b_t = torch.randn(6, 8), torch.randn(6, 5), torch.randn(9, 8), torch.randn(9, 5)
    for args in ((a_s, a_t, None, None, 0.5, True), (a_s, a_t, b_s, b_t, 0.5, False),
                 (a_s, a_t, torch.cat([a_s, b_s]), torch.cat([a_t, b_t]), 0.5, True)):
        torch.testing.assert_close(entry.correlation_rows(*args), reference.correlation_kl_rows(*args),
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------------------------
def _fused_namespaces():
    out = []
    for name, namespace in FUSED.items():
        if name == "native" and not _native.LOADED:
            continue
        if name == "triton" and backends._triton is None:
            continue
        out.append(namespace)
    return out


@pytest.fixture(params=list(FUSED.values()))
def namespace(request):
    if request.param not in _fused_namespaces():
        pytest.skip(f"{request.param} ops are not defined here")
    return getattr(torch.ops, request.param)


F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@pytest.mark.parametrize("s_dtype, t_dtype, rows_dtype", [
    (F32, F32, F32), (BF16, F32, F32), (F16, BF16, F32), (F64, F64, F64), (F16, F64, F64), (F64, BF16, F64)])
@pytest.mark.parametrize("student_grad, teacher_grad", [(True, False), (True, True), (False, False)])
def test_kd_kl_fake_shapes_and_dtypes(namespace, s_dtype, t_dtype, rows_dtype, student_grad, teacher_grad):
    s = torch.empty(7, 33, dtype=s_dtype, device="meta")
    t = torch.empty(7, 33, dtype=t_dtype, device="meta")
    w = torch.empty(7, dtype=rows_dtype, device="meta")
    rows, grad_s, grad_t = namespace.kd_kl(s, t, w, 2.0, student_grad, teacher_grad)
    assert rows.shape == (7,) and rows.dtype == rows_dtype and rows.device.type == "meta"
    assert grad_s.dtype == s_dtype and grad_s.shape == ((7, 33) if student_grad else (0,))
    assert grad_t.dtype == t_dtype and grad_t.shape == ((7, 33) if teacher_grad else (0,))


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_scale_rows_fakes(namespace, dtype):
    x = torch.empty(5, 9, dtype=dtype, device="meta")
    g = torch.empty(5, dtype=F64 if dtype == F64 else F32, device="meta")
    out = namespace.scale_rows(x, g)
    assert out.shape == x.shape and out.dtype == dtype
    assert namespace.scale_rows_(x, g) is None


@pytest.mark.parametrize("dtypes, math, square", [
    ((F32, F32), F32, True), ((BF16, F16), F32, True), ((F64, F32), F64, True), ((F16, F64), F64, True),
    ((F32, F32, F32, F32), F32, False), ((BF16, F16, BF16, F16), F32, False),
    ((F64, F32, F64, F32), F64, False), ((F32, F32, F32, F64), F64, False)])
def test_correlation_fakes(namespace, dtypes, math, square):
    a_s, a_t = (torch.empty(6, d, dtype=x, device="meta") for d, x in ((8, dtypes[0]), (5, dtypes[1])))
    b_s, b_t = (None, None) if square else (torch.empty(4, d, dtype=x, device="meta")
                                            for d, x in ((8, dtypes[2]), (5, dtypes[3])))
    outs = namespace.correlation_fwd(a_s, a_t, b_s, b_t, 0.5, square)
    assert all(o.shape == (6,) and o.dtype == math for o in outs)
    lse = torch.empty(6, dtype=math, device="meta")
    d_a, d_b = namespace.correlation_bwd(lse, a_s, a_t, b_s, b_t, lse, lse, 0.5, square)
    assert d_a.shape == a_s.shape and d_a.dtype == a_s.dtype
    assert d_b.shape == ((0,) if square else b_s.shape) and d_b.dtype == (a_s.dtype if square else b_s.dtype)


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_fakes_agree_with_the_kernels(namespace, dtype):
    """The real ops on CPU give what the fakes promise (shapes and dtypes)."""
    backend = next(n for n, ns in FUSED.items() if getattr(torch.ops, ns) is namespace)
    require_backend(backend, "cpu")
    s, t = torch.randn(4, 20, dtype=dtype), torch.randn(4, 20, dtype=F32)
    real = namespace.kd_kl(s, t, None, 2.0, True, True)
    fake = namespace.kd_kl(s.to("meta"), t.to("meta"), None, 2.0, True, True)
    assert [(x.shape, x.dtype) for x in real] == [(x.shape, x.dtype) for x in fake]
    a_s, a_t = torch.randn(6, 8, dtype=dtype), torch.randn(6, 5)
    real = namespace.correlation_fwd(a_s, a_t, None, None, 0.5, True)
    fake = namespace.correlation_fwd(a_s.to("meta"), a_t.to("meta"), None, None, 0.5, True)
    assert [(x.shape, x.dtype) for x in real] == [(x.shape, x.dtype) for x in fake]


# ---------------------------------------------------------------------------------------------
# the autograd glue
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=list(FUSED))
def cpu_namespace(request):
    require_backend(request.param, "cpu")
    return getattr(torch.ops, FUSED[request.param])


def _stored_kl(namespace):
    s = torch.randn(5, 30, requires_grad=True)
    t = torch.randn(5, 30)
    rows, stored, _ = namespace.kd_kl(s, t, None, 2.0, True, False)
    handed = []
    s.register_hook(lambda grad: handed.append(grad))
    return s, rows, stored, stored.detach().clone(), handed


def test_stored_gradient_is_scaled_in_place_and_handed_on_when_the_graph_is_freed(cpu_namespace):
    s, rows, stored, before, handed = _stored_kl(cpu_namespace)
    g = torch.tensor([1.0, 0.5, 2.0, 1.0, -3.0])
    rows.backward(g)
    torch.testing.assert_close(stored, before * g[:, None])  # the saved tensor itself, scaled in place
    assert handed[0].data_ptr() == stored.data_ptr()  # handed on, no copy
    torch.testing.assert_close(s.grad, before * g[:, None])
    torch.testing.assert_close(stored[0], before[0], rtol=0, atol=0)  # factor 1: untouched


@pytest.mark.parametrize("keep", ["retain_graph", "create_graph"])
def test_stored_gradient_is_copied_when_the_graph_is_kept(cpu_namespace, keep):
    s, rows, stored, before, handed = _stored_kl(cpu_namespace)
    g = torch.tensor([1.0, 0.5, 2.0, 1.0, -3.0])
    (grad,) = torch.autograd.grad(rows, s, g, **{keep: True})
    torch.testing.assert_close(stored, before, rtol=0, atol=0)  # the saved tensor is left as it was
    assert handed[0].data_ptr() != stored.data_ptr()
    torch.testing.assert_close(grad, before * g[:, None])
    if keep == "retain_graph":  # the graph is still usable: a second backward, which frees it
        (again,) = torch.autograd.grad(rows, s, g)
        torch.testing.assert_close(again, before * g[:, None])


def test_unit_factor_costs_nothing_after_total_backward(cpu_namespace):
    """``total.backward()`` on the summed rows: the factor is 1, the stored gradient is handed on as it is."""
    s, rows, stored, before, handed = _stored_kl(cpu_namespace)
    rows.sum().backward()
    assert handed[0].data_ptr() == stored.data_ptr()
    torch.testing.assert_close(s.grad, before, rtol=0, atol=0)


def test_graph_freed_is_false_outside_a_backward():
    assert not ops.graph_freed_after_this_backward(torch.ones(3))


def test_correlation_autograd_reaches_only_the_student(cpu_namespace):
    a_s = torch.randn(6, 8, dtype=F64, requires_grad=True)
    a_t = torch.randn(6, 5, dtype=F64, requires_grad=True)
    b_s = torch.randn(4, 8, dtype=F64, requires_grad=True)
    b_t = torch.randn(4, 5, dtype=F64, requires_grad=True)
    g = torch.rand(6, dtype=F64)
    rows = cpu_namespace.correlation_fwd(a_s, a_t, b_s, b_t, 0.5, False)[0]
    d_a, d_b = torch.autograd.grad(rows, (a_s, b_s), g)
    ref = reference.correlation_kl_rows(a_s, a_t.detach(), b_s, b_t.detach(), 0.5, False)
    want_a, want_b = torch.autograd.grad(ref, (a_s, b_s), g)
    torch.testing.assert_close(d_a, want_a)
    torch.testing.assert_close(d_b, want_b)
    rows = cpu_namespace.correlation_fwd(a_s, a_t, b_s, b_t, 0.5, False)[0]
    rows.sum().backward()
    assert a_t.grad is None and b_t.grad is None
