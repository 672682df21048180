"""What ``backend="auto"`` picks, and ``mlkd_fast.explain`` saying so (docs/design.md §5.1).

The choice is a decision on the device and the shapes, tested here as a table (never as a timing):
on CPU the native correlation is materialised ("dense") while M x N <= DENSE_MAX_ENTRIES (2^28, the
measured crossover: 1 GiB of stored gradient operand) and fused-tiled beyond, where memory decides.
Both CPU paths are then checked against the fp64 reference on shapes that cross their blocks and
tiles, and the dense path's own ops are opchecked.
"""
import pytest
import torch

import mlkd_fast
from helpers import rel_err, require_backend
from mlkd_fast import backends, functional as MF, fused, ops, reference
from mlkd_fast.backends import DENSE_MAX_ENTRIES, ENV_VAR, Choice


@pytest.fixture
def native_cpu(monkeypatch):
    require_backend("native", "cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "CORRELATION_PATH", "auto")


# ---------------------------------------------------------------------------------------------
# the decision table
# ---------------------------------------------------------------------------------------------
# (rows M, columns N) of the similarity matrices -> the native CPU path
CPU_TABLE = [
    ((64, 64), "dense"),                  # square, the smallest training batch
    ((1024, 1024), "dense"),
    ((4096, 4096), "dense"),
    ((16384, 16384), "dense"),            # 2^28 entries: the largest materialised square (1 GiB operand)
    ((16385, 16385), "tiled"),
    ((32768, 32768), "tiled"),            # the memory target: < 1 GB extra, eager cannot run
    ((3 * 256, 256), "dense"),            # the rotations' rectangle, 3B x B
    ((3 * 4096, 4096), "dense"),          # 50M entries: tiled would be slower than eager here
    ((3 * 9459, 9459), "dense"),          # the largest materialised rectangle
    ((3 * 9460, 9460), "tiled"),
    ((3 * 16384, 16384), "tiled"),
    ((4096, 65536), "dense"),             # one DDP shard's rows against the global batch: exactly 2^28
    ((4096, 65537), "tiled"),
]


@pytest.mark.parametrize("shape, path", CPU_TABLE, ids=[f"{m}x{n}" for (m, n), _ in CPU_TABLE])
def test_cpu_correlation_path_table(native_cpu, shape, path):
    m, n = shape
    choice = backends.choose("correlation", "cpu", m, n)
    assert (choice.backend, choice.path) == ("native", path)
    assert (m * n <= DENSE_MAX_ENTRIES) == (path == "dense")
    assert "memory decides" in choice.reason if path == "tiled" else "faster than eager" in choice.reason


def test_crossover_is_one_gib_of_operand():
    assert DENSE_MAX_ENTRIES == 1 << 28 and DENSE_MAX_ENTRIES * 4 == 1 << 30


def test_kl_takes_the_fused_kernel_at_every_shape(native_cpu):
    for rows in (1, 64, 4096, 8192 * 4):
        choice = backends.choose("kd_kl", "cpu", rows)
        assert (choice.backend, choice.path) == ("native", "fused")


def test_cuda_rule_is_the_fused_kernels():
    path, reason = backends.correlation_path(torch.device("cuda"), 65536, 65536)
    assert path == "fused" and "O(M + N)" in reason
    assert backends.correlation_path(torch.device("cuda"), 64, 64)[0] == "fused"


def test_without_native_auto_takes_the_reference(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    import dataclasses

    down = dataclasses.replace(backends.REGISTRY["native"], status=lambda d: backends.BackendStatus(False, "fake: not built"))
    monkeypatch.setitem(backends.REGISTRY, "native", down)
    choice = backends.choose("correlation", "cpu", 4096)
    assert (choice.backend, choice.path) == ("torch", "materialised")
    assert "native: fake: not built" in choice.reason


def test_forced_path_and_environment(native_cpu, monkeypatch):
    monkeypatch.setattr(backends, "CORRELATION_PATH", "tiled")
    choice = backends.choose("correlation", "cpu", 64)
    assert choice.path == "tiled" and backends.PATH_ENV_VAR in choice.reason
    monkeypatch.setattr(backends, "CORRELATION_PATH", "bogus")
    with pytest.raises(ValueError, match=backends.PATH_ENV_VAR):
        backends.choose("correlation", "cpu", 64)
    monkeypatch.setattr(backends, "CORRELATION_PATH", "auto")
    monkeypatch.setenv(ENV_VAR, "torch")
    choice = backends.choose("correlation", "cpu", 64)
    assert choice.backend == "torch" and ENV_VAR in choice.reason
    assert backends.choose("correlation", "cpu", 64, backend="native").reason.startswith("asked for")


def test_choose_rejects_unknown_ops_and_backends(native_cpu):
    with pytest.raises(ValueError, match="op must be"):
        backends.choose("softmax", "cpu", 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.choose("kd_kl", "cpu", 4, backend="cuda")


# ---------------------------------------------------------------------------------------------
# explain: the same decision from a call's own arguments
# ---------------------------------------------------------------------------------------------
def test_explain_reads_the_call(native_cpu):
    f, g = torch.randn(64, 8), torch.randn(64, 4)
    choice = mlkd_fast.explain(MF.correlation_kl, f, g)
    assert isinstance(choice, Choice) and (choice.op, choice.backend, choice.path) == ("correlation", "native", "dense")
    assert "backend 'native', path 'dense'" in str(choice)
    rect = mlkd_fast.explain("correlation_kl", torch.empty(3 * 9460, 2), torch.empty(3 * 9460, 2),
                             torch.empty(9460, 2), torch.empty(9460, 2))
    assert rect.path == "tiled"
    assert mlkd_fast.explain("correlation_kl", f, g, backend="torch").path == "materialised"
    kl = mlkd_fast.explain("kd_kl_div", torch.randn(2, 3, 10), torch.randn(2, 3, 10), temperature=2.0)
    assert (kl.op, kl.backend, kl.path) == ("kd_kl", "native", "fused")


def test_explain_degenerate_and_bad_arguments(native_cpu):
    two = torch.randn(2, 4)
    assert mlkd_fast.explain("correlation_kl", two, two).path == "zero"  # 1 valid column per row
    assert mlkd_fast.explain("correlation_kl", two, two, keep_diagonal=True).path == "dense"
    with pytest.raises(ValueError, match="explain: op must be"):
        mlkd_fast.explain("cross_entropy", two, two)
    with pytest.raises(TypeError):
        mlkd_fast.explain("correlation_kl", two, two, no_such_argument=1)
    assert mlkd_fast.explain is fused.explain and "explain" in mlkd_fast.__all__


@pytest.mark.parametrize("forced", ["auto", "dense", "tiled"])
def test_the_call_takes_the_path_explain_names(native_cpu, monkeypatch, forced):
    monkeypatch.setattr(backends, "CORRELATION_PATH", forced)
    taken = []
    dense, tiled = ops.dense_correlation_rows, backends._native_tiled_correlation_rows
    monkeypatch.setattr(ops, "dense_correlation_rows", lambda *a: taken.append("dense") or dense(*a))
    monkeypatch.setattr(backends, "_native_tiled_correlation_rows", lambda *a: taken.append("tiled") or tiled(*a))
    f, g = torch.randn(40, 8, requires_grad=True), torch.randn(40, 4)
    MF.correlation_kl(f, g).backward()
    assert taken == [mlkd_fast.explain(MF.correlation_kl, f, g).path]
    assert taken == (["dense"] if forced == "auto" else [forced])


# ---------------------------------------------------------------------------------------------
# both CPU paths against the fp64 reference, across their blocks and tiles
# ---------------------------------------------------------------------------------------------
def _against_reference(a_s, a_t, b_s=None, b_t=None, exclude=True, dtype=torch.float32, tol=2e-5):
    leaves = [x.to(dtype).requires_grad_() for x in (a_s, b_s) if x is not None]
    cols = (None, None) if b_s is None else (leaves[1], b_t.to(dtype))
    go = torch.rand(a_s.shape[0]) + 0.5
    rows = backends.REGISTRY["native"].correlation_rows(leaves[0], a_t.to(dtype), *cols, 0.3, exclude)
    grads = torch.autograd.grad(rows, leaves, go.to(rows.dtype))
    dbl = [x.double().requires_grad_() for x in (a_s, b_s) if x is not None]
    ref = reference.correlation_kl_rows(dbl[0], a_t.double(), *(dbl[1:] or [None]),
                                        None if b_t is None else b_t.double(), 0.3, exclude)
    ref_grads = torch.autograd.grad(ref, dbl, go.double())
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(rows, ref) <= tol, f"loss error {rel_err(rows, ref):.2e}"
    for g, r, leaf in zip(grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype
        assert rel_err(g, r) <= 4 * tol, f"gradient error {rel_err(g, r):.2e}"


@pytest.mark.parametrize("path", ["dense", "tiled"])
@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular", "shard"])
def test_cpu_paths_across_blocks_and_tiles(native_cpu, monkeypatch, path, mode):
    """1500 rows: several dense row blocks (and, at D = 300, several blocks of the symmetric backward
    operand) and several 1024-tiles; the shard's diagonal lies off the first tile."""
    monkeypatch.setattr(backends, "CORRELATION_PATH", path)
    d = 300 if mode == "square" else 24
    m, n = {"rectangular": (2100, 1100), "shard": (1100, 2300)}.get(mode, (1500, 1500))
    a_s, a_t = torch.randn(m, d) * 2, torch.randn(m, 9)
    if mode == "rectangular":
        _against_reference(a_s, a_t, torch.randn(n, d), torch.randn(n, 9) * 3, exclude=False)
    elif mode == "shard":
        _against_reference(a_s, a_t, torch.cat([a_s, torch.randn(n - m, d)]), torch.cat([a_t, torch.randn(n - m, 9)]))
    else:
        _against_reference(a_s, a_t, exclude=mode == "square")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dense_path_in_every_dtype(native_cpu, monkeypatch, dtype):
    monkeypatch.setattr(backends, "CORRELATION_PATH", "dense")
    tol = {torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    base = [torch.randn(70, 300), torch.randn(70, 40)]
    _against_reference(*[x.to(dtype).float() for x in base], dtype=dtype, tol=tol)
    rect = [torch.randn(90, 33), torch.randn(90, 20), torch.randn(30, 33), torch.randn(30, 20)]
    _against_reference(rect[0].to(dtype).float(), rect[1], rect[2].to(dtype).float(), rect[3], exclude=False,
                       dtype=dtype, tol=tol)


def test_dense_forward_stores_the_operand_only_for_a_gradient(native_cpu):
    dense = getattr(torch.ops, ops.DENSE_NAMESPACE)
    a, t = torch.randn(50, 16), torch.randn(50, 8)
    rows, operand = dense.correlation_fwd(a, t, None, None, 0.5, True, False)
    assert rows.shape == (50,) and operand.numel() == 0
    rows2, operand = dense.correlation_fwd(a, t, None, None, 0.5, True, True)
    assert operand.shape == (50, 50) and torch.equal(operand.diagonal(), torch.zeros(50))
    torch.testing.assert_close(rows, rows2)
    torch.testing.assert_close(operand.sum(1), torch.zeros(50), atol=1e-5, rtol=0)  # rows of Q - P sum to 0
    with torch.no_grad():
        assert MF.correlation_kl(a.requires_grad_(), t).requires_grad is False


@pytest.mark.parametrize("requires_grad", [False, True])
def test_dense_ops_opcheck(native_cpu, requires_grad):
    dense = getattr(torch.ops, ops.DENSE_NAMESPACE)
    a_s = torch.randn(20, 16, requires_grad=requires_grad)
    a_t = torch.randn(20, 24)
    b_s = torch.randn(7, 16, requires_grad=requires_grad)
    b_t = torch.randn(7, 24)
    torch.library.opcheck(dense.correlation_fwd.default, (a_s, a_t, None, None, 0.5, True, requires_grad))
    torch.library.opcheck(dense.correlation_fwd.default, (a_s, a_t, b_s, b_t, 0.5, False, requires_grad))
    _, operand = dense.correlation_fwd(a_s.detach(), a_t, b_s.detach(), b_t, 0.5, False, True)
    torch.library.opcheck(dense.correlation_bwd.default, (torch.rand(20), operand, a_s.detach(), b_s.detach()))


def test_dense_path_under_torch_compile(native_cpu):
    torch._dynamo.reset()
    f, g = torch.randn(30, 12, requires_grad=True), torch.randn(30, 8)
    compiled = torch.compile(lambda x, y: MF.correlation_kl(x, y), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(f, g), f)[0]
    want = torch.autograd.grad(MF.correlation_kl(f, g, backend="torch"), f)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
