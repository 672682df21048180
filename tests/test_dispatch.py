"""The dispatch and autograd layers themselves (docs/design.md §3): the op table and the compiled
library's schemas, the import graph, the backend registry and its per-call resolution (unavailable
backends, the environment variable), the fakes, and the autograd glue of the fused ops (mlkd_fast.ops:
register_fakes_and_autograd, the per-row functions, the fp16 gradient scale), checked on the kernel
backends and on a namespace whose kernels are the reference."""
import ast
import concurrent.futures
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlkd_fast
from helpers import FUSED_NAMESPACE as FUSED, require_backend
from mlkd_fast import _native, backends, functional as MF, ops, reference
from mlkd_fast.backends import ENV_VAR, REGISTRY, BackendStatus, resolve_backend

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_unavailable_backend_says_why(backend, monkeypatch):
    device = torch.device("meta")  # no kernel backend runs on meta tensors
    with pytest.raises(ValueError, match=f"backend '{backend}' is not available on meta: .+"):
        resolve_backend(backend, device)


def test_unavailable_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        MF.kd_kl_div(torch.randn(4, 10), torch.randn(4, 10))


def test_available_backends_reports_every_backend_with_a_reason():
    status = mlkd_fast.available_backends("cpu")
    assert set(status) == {"torch", "triton", "native"}
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


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


def test_stored_gradient_outputs_get_no_gradient(cpu_namespace):
    """kd_kl's second and third outputs are the gradients stored in the forward: a backward through
    them reaches nothing (the backward gets no grad_rows), and beside the rows they change nothing."""
    s, _, stored, _, _ = _stored_kl(cpu_namespace)
    assert torch.autograd.grad(stored.sum(), s, allow_unused=True) == (None,)
    s, rows, stored, before, _ = _stored_kl(cpu_namespace)
    (grad,) = torch.autograd.grad(rows.sum() + 3.0 * stored.sum(), s)
    torch.testing.assert_close(grad, before, rtol=0, atol=0)


def test_fp16_gradient_scale():
    """Powers of two that bring the largest stored fp16 student entry to ~1024 (w_i T (q - p) is at
    most w_i T); with the teacher's gradient stored too, only 1 / w_i; none when nothing is fp16 or
    needs a gradient, or under no_grad; 1 for rows of weight 0."""
    w = torch.tensor([1 / 512, 0.0, 1.0, 3.0])
    half = torch.randn(4, 9).half()
    s, t = half.clone().requires_grad_(), half.clone()
    scale = ops.fp16_gradient_scale(s, t, w, 2.0)
    torch.testing.assert_close(scale, torch.tensor([2.0**18, 1.0, 2.0**9, 2.0**7]), rtol=0, atol=0)
    assert ops.fp16_gradient_scale(s, t, None, 4.0).tolist() == [2.0**8] * 4
    assert ops.fp16_gradient_scale(s, t.requires_grad_(), w, 2.0).tolist() == [2.0**9, 1.0, 1.0, 0.25]
    assert ops.fp16_gradient_scale(half.float(), half.clone().requires_grad_(), w, 2.0).tolist() == [2.0**9, 1.0, 1.0, 0.25]
    # no fp16 gradient stored: none
    assert ops.fp16_gradient_scale(half.float().requires_grad_(), half.bfloat16(), w, 2.0) is None
    assert ops.fp16_gradient_scale(half.clone(), half.float().requires_grad_(), w, 2.0) is None
    assert ops.fp16_gradient_scale(half.clone(), half.clone(), w, 2.0) is None
    with torch.no_grad():
        assert ops.fp16_gradient_scale(s, t, w, 2.0) is None
    assert ops.fp16_gradient_scale(s, t, torch.tensor([1e-30, 1.0, 1.0, 1.0]), 1.0)[0] == 2.0**60  # clamped


# A namespace whose kernels are the reference (fp64 autograd inside the kernel): the autograd glue
# of mlkd_fast.ops (register_fakes_and_autograd via define_ops, the per-row functions) on its own.
REFERENCE_NAMESPACE = "mlkd_fast_test_reference"


def _with_autograd(fn):
    """fn() in a fresh thread: a kernel runs below the autograd dispatch key (thread-local state),
    where nothing records a graph; a new thread starts from the default state."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def _ref_kd_kl(s, t, row_weight, temperature, student_grad, teacher_grad):
    def rows_and_grads():
        s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
        rows = reference.kd_kl_rows(s64, t64, temperature, None if row_weight is None else row_weight.double())
        return (rows.detach(),) + torch.autograd.grad(rows.sum(), (s64, t64))

    rows, g_s, g_t = _with_autograd(rows_and_grads)
    return (rows.detach().to(ops.math_dtype(s, t)), g_s.to(s.dtype) if student_grad else s.new_empty(0),
            g_t.to(t.dtype) if teacher_grad else t.new_empty(0))


def _ref_scale_rows(x, g):
    return (x * g[:, None]).to(x.dtype)


def _ref_scale_rows_(x, g):
    x.mul_(g[:, None])


def _ref_correlation_fwd(a_s, a_t, b_s, b_t, tau, exclude_diagonal):
    dtype = ops.math_dtype(a_s, a_t, b_s, b_t)
    rows = reference.correlation_kl_rows(a_s.to(dtype), a_t.to(dtype), None if b_s is None else b_s.to(dtype),
                                         None if b_t is None else b_t.to(dtype), tau, exclude_diagonal)
    return rows, rows.new_zeros(rows.shape), rows.new_zeros(rows.shape)  # no statistics: the backward recomputes


def _ref_correlation_bwd(g, a_s, a_t, b_s, b_t, lse_s, lse_t, tau, exclude_diagonal):
    def grads_of_the_rows():
        leaves = [x.detach().double().requires_grad_() for x in (a_s, b_s) if x is not None]
        rows = reference.correlation_kl_rows(leaves[0], a_t.double(), leaves[1] if b_s is not None else None,
                                             None if b_t is None else b_t.double(), tau, exclude_diagonal)
        return torch.autograd.grad(rows, leaves, g.double())

    grads = _with_autograd(grads_of_the_rows)
    return grads[0].to(a_s.dtype), (grads[1].to(b_s.dtype) if b_s is not None else a_s.new_empty(0))


@pytest.fixture(scope="module")
def reference_namespace():
    if not hasattr(torch.ops, REFERENCE_NAMESPACE) or not _namespace_ops(REFERENCE_NAMESPACE):
        ops.define_ops(REFERENCE_NAMESPACE, {"kd_kl": _ref_kd_kl, "scale_rows": _ref_scale_rows,
                                             "scale_rows_": _ref_scale_rows_, "correlation_fwd": _ref_correlation_fwd,
                                             "correlation_bwd": _ref_correlation_bwd})
    return REFERENCE_NAMESPACE


@pytest.mark.parametrize("keep_graph", [False, True])
def test_glue_gives_the_reference_kd_kl_gradients(reference_namespace, keep_graph):
    """Through the glue (the stored gradients scaled by grad_rows, in place or not) the student and
    teacher gradients are the reference's, for any grad_rows, masked rows and a weight."""
    rows_fn = ops.fused_kd_kl_rows(reference_namespace)
    s = torch.randn(5, 7, dtype=F64, requires_grad=True)
    t = torch.randn(5, 7, dtype=F64, requires_grad=True)
    w = torch.tensor([0.5, 0.0, 1.0, 2.0, 1.0], dtype=F64)
    g = torch.rand(5, dtype=F64) - 0.3
    got = torch.autograd.grad(rows_fn(s, t, 2.5, w), (s, t), g, retain_graph=keep_graph)
    want = torch.autograd.grad(reference.kd_kl_rows(s, t, 2.5, w), (s, t), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rows_fn(s, t, 2.5, w), reference.kd_kl_rows(s, t, 2.5, w))


def test_glue_gradcheck_kd_kl(reference_namespace):
    rows_fn = ops.fused_kd_kl_rows(reference_namespace)
    s = torch.randn(4, 6, dtype=F64, requires_grad=True)
    t = torch.randn(4, 6, dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda a, b: rows_fn(a, b, 1.7, w), (s, t))
    assert torch.autograd.gradcheck(lambda a: rows_fn(a, t.detach(), 1.7, None), (s,))


def test_glue_fp16_student_gradient_survives_a_small_weight(reference_namespace):
    """fp16 inputs: fused_kd_kl_rows stores the gradient scaled up (fp16_gradient_scale) and divides
    the rows by the scale, so the rows and the gradient equal those of the unscaled fp64 math."""
    rows_fn = ops.fused_kd_kl_rows(reference_namespace)
    s = (torch.randn(6, 40) * 3).half().requires_grad_()
    t = (torch.randn(6, 40) * 3).half()
    w = torch.full((6,), 1 / 4096)
    rows = rows_fn(s, t, 2.0, w)
    (grad,) = torch.autograd.grad(rows, s, torch.full((6,), 65536.0))
    s64 = s.detach().double().requires_grad_()
    ref = reference.kd_kl_rows(s64, t.double(), 2.0, w.double())
    (want,) = torch.autograd.grad(ref, s64, torch.full((6,), 65536.0, dtype=F64))
    torch.testing.assert_close(rows.double(), ref, rtol=1e-6, atol=1e-12)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad.double(), want, rtol=2**-10, atol=0)


@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular"])
def test_glue_gradcheck_correlation(reference_namespace, mode):
    """The correlation's glue: gradients to the student rows and columns, none to the teacher."""
    rows_fn = ops.fused_correlation_rows(reference_namespace)
    a_s = torch.randn(6, 4, dtype=F64, requires_grad=True)
    a_t = torch.randn(6, 3, dtype=F64, requires_grad=True)
    if mode == "rectangular":
        b_s = torch.randn(5, 4, dtype=F64, requires_grad=True)
        b_t = torch.randn(5, 3, dtype=F64)
        assert torch.autograd.gradcheck(lambda x, y: rows_fn(x, a_t, y, b_t, 0.7, False), (a_s, b_s))
    else:
        exclude = mode == "square"
        assert torch.autograd.gradcheck(lambda x: rows_fn(x, a_t, None, None, 0.7, exclude), (a_s,))
    rows_fn(a_s, a_t, None, None, 0.7, True).sum().backward()
    assert a_s.grad is not None and a_t.grad is None


@pytest.mark.parametrize("namespace_of", ["reference", "triton", "native"])
def test_correlation_backward_through_the_statistics_alone_reaches_nothing(namespace_of, request):
    """As kd_kl's stored gradients, correlation_fwd's lse outputs get no gradient (materialize_grads
    is off): a backward through them alone gives the student none (gradcheck's undefined-grad check)."""
    if namespace_of == "reference":
        namespace = request.getfixturevalue("reference_namespace")
    else:
        require_backend(namespace_of, "cpu")
        namespace = FUSED[namespace_of]
    a_s = torch.randn(6, 4, dtype=F64, requires_grad=True)
    _, lse_s, _ = getattr(torch.ops, namespace).correlation_fwd(a_s, torch.randn(6, 3, dtype=F64), None, None, 0.5, True)
    assert torch.autograd.grad(lse_s.sum(), a_s, allow_unused=True) == (None,)
