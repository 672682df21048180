"""The backend registry and its per-call resolution: auto order, MLKD_FAST_BACKEND, unavailable backends' reasons, per-row functions."""
import dataclasses
import inspect
import os

import pytest
import torch

import mlkd_fast
from helpers import require_backend
from mlkd_fast import backends, functional as MF, reference
from mlkd_fast.backends import ENV_VAR, REGISTRY, BackendStatus, resolve_backend


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
        if entry.kd_kl_rows is not None:
            assert positional(entry.kd_kl_rows) == 4, entry.name
        if entry.correlation_rows is not None:
            assert positional(entry.correlation_rows) == 6, entry.name


@pytest.fixture
def partial(monkeypatch):
    """A backend with the KD op only, first in CPU's auto order; its calls are recorded."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    calls = []

    def kd_kl_rows(s, t, temperature, row_weight):
        calls.append("kd_kl_rows")
        return reference.kd_kl_rows(s, t, temperature, row_weight)

    entry = backends.Backend("partial", lambda device: BackendStatus(True, "partial: up"), kd_kl_rows=kd_kl_rows)
    monkeypatch.setitem(REGISTRY, "partial", entry)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("partial", *backends.AUTO_ORDER["cpu"]))
    return entry, calls


def test_a_backend_may_implement_a_subset_of_the_ops(partial):
    partial, calls = partial
    cpu = torch.device("cpu")
    assert partial.ops == ("kd_kl",) and partial.implements("kd_kl") and not partial.implements("correlation")
    # auto: each op from the first available backend that implements it
    assert backends.resolve("auto", cpu, op="kd_kl") is partial
    following = next(n for n in backends.AUTO_ORDER["cpu"][1:] if REGISTRY[n].status(cpu))
    assert backends.resolve("auto", cpu, op="correlation") is REGISTRY[following]
    merged = backends.resolve("auto", cpu)  # callers that do not name the op: the gaps filled in order
    assert merged.name == "partial" and merged.correlation_rows is REGISTRY[following].correlation_rows
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(MF.kd_kl_div(s, t), MF.kd_kl_div(s, t, backend="torch"))
    f, g = torch.randn(6, 3), torch.randn(6, 2)
    torch.testing.assert_close(MF.correlation_kl(f, g), MF.correlation_kl(f, g, backend="torch"))
    assert calls == ["kd_kl_rows"]
    choice = backends.choose("correlation", "cpu", 6)
    assert choice.backend == following and "partial: does not implement the correlation op" in choice.reason


def test_a_training_run_pins_auto_to_a_complete_backend_but_not_to_a_partial_one(partial, monkeypatch):
    """``pinned_backend`` (what mlkd-train hands its method): ``auto`` and the environment variable
    resolved once to a backend implementing every op; a partial first backend leaves ``auto`` as it is,
    so that each op still finds its own."""
    cpu = torch.device("cpu")
    assert backends.pinned_backend("auto", cpu) == "auto"  # "partial" comes first and lacks the correlation
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", backends.AUTO_ORDER["cpu"][1:])
    first = next(n for n in backends.AUTO_ORDER["cpu"] if REGISTRY[n].status(cpu))
    assert backends.pinned_backend("auto", cpu) == first
    monkeypatch.setenv(ENV_VAR, "torch")
    assert backends.pinned_backend("auto", cpu) == "torch" and backends.pinned_backend("partial", cpu) == "partial"


def test_a_backend_asked_for_an_op_it_lacks_names_the_op(partial, monkeypatch):
    partial, calls = partial
    cpu = torch.device("cpu")
    message = r"backend 'partial' does not implement the correlation op \(it has: kd_kl\); backends that do: torch"
    with pytest.raises(ValueError, match=message):
        backends.resolve("partial", cpu, op="correlation")
    with pytest.raises(ValueError, match=message):  # through the functional API (resolved without the op)
        MF.correlation_kl(torch.randn(6, 3), torch.randn(6, 2), backend="partial")
    monkeypatch.setenv(ENV_VAR, "partial")
    with pytest.raises(ValueError, match=rf"backend 'partial' \(from the environment variable {ENV_VAR}\) does not "
                                         r"implement the correlation op"):
        MF.correlation_kl(torch.randn(6, 3), torch.randn(6, 2))
    MF.kd_kl_div(torch.randn(3, 4), torch.randn(3, 4))  # the op it has runs
    assert calls == ["kd_kl_rows"]
    with pytest.raises(ValueError, match="op must be one of"):
        backends.resolve("torch", cpu, op="softmax")
    with pytest.raises(ValueError, match="implements none of the ops"):
        backends.Backend("empty", lambda device: BackendStatus(True, ""))


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
    monkeypatch.setattr(backends, "resolve", lambda b, d, op=None: resolved.append(b) or resolve(b, d, op))
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
