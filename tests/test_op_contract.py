"""The op contract (mlkd_fast.ops): the schema table, the compiled and Triton ops defined from it, define_ops, NORM_EPS."""
from pathlib import Path

import pytest
import torch

from helpers import namespace_ops
from mlkd_fast import _native, backends, ops, reference

ROOT = Path(__file__).resolve().parents[1]


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
    assert namespace_ops(ops.NATIVE_NAMESPACE) == set(ops.SCHEMAS)
    assert namespace_ops("mlkd_fast_build") == {"built_with_cuda"}


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_triton_ops_are_defined_from_the_table(name):
    if backends._triton is None:
        pytest.skip(backends._TRITON_ERROR)
    assert namespace_ops(ops.TRITON_NAMESPACE) == set(ops.SCHEMAS)
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
    sources = [p for p in (ROOT / "mlkd_fast").glob("*.py")] + list((ROOT / "mlkd_fast" / "kernels").glob("*.py"))
    defining = [p.name for p in sources if "NORM_EPS = " in p.read_text()]
    assert defining == ["ops.py"]
