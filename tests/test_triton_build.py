"""Every Triton kernel variant the launchers pick compiles for sm_90 (no GPU needed), fits in the
shared memory an H100 grants a block, and does not spill (beyond a few bytes) — the checks the
interpreter that runs the kernels' arithmetic in CI cannot make. See tools/triton_build.py;
its committed report is benchmarks/results/triton_build_sm90.md."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ptxas reports 0 bytes for the variants at the docs/design.md §5 shapes; a few mixed-width ones spill
# up to ~400 bytes. The limit catches a configuration that does not fit (64-row fp32 tiles with
# 3 stages, say, spill ~22 KB).
MAX_SPILL_BYTES = 512


def _unavailable() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        return f"Triton's NVIDIA backend is missing ({err})"
    if not os.path.exists(get_ptxas(90).path):
        return "Triton's bundled ptxas is missing"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("triton_build") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tools.triton_build", "--arch", "90", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done


def test_every_variant_compiles_for_sm90(report):
    data, done = report
    assert not data["errors"], data["errors"]
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = {v["kernel"] for v in data["variants"]}
    assert {"_kd_kl_fused_kernel", "_kd_kl_looped_kernel", "_kd_kl_stats_kernel", "_kd_kl_grad_kernel",
            "_scale_rows_kernel", "_scale_rows_inplace_kernel", "_corr_fwd_kernel", "_corr_fwd_merge_kernel",
            "_corr_bwd_rows_kernel", "_corr_bwd_cols_kernel", "_tile_stats_kernel",
            "_tile_grad_operands_kernel", "_linear_kd_rows_kernel"} <= kernels


def test_shared_memory_within_the_h100_limit(report):
    data, _ = report
    over = [(v["kernel"], v["shared"], v["cases"][0]) for v in data["variants"] if v["shared"] > data["shared_limit"]]
    assert not over


def test_no_register_spills(report):
    data, _ = report
    spilling = [(v["kernel"], v["spill_stores"], v["cases"][0]) for v in data["variants"]
                if v["spill_stores"] > MAX_SPILL_BYTES]
    assert not spilling


def test_spec_shapes_take_the_intended_paths(report):
    data, _ = report
    by_case = {}
    for v in data["variants"]:
        for case in v["cases"]:
            by_case.setdefault(case, set()).add(v["kernel"])
    assert by_case["kd_kl bfloat16 8192x32000"] == {"_kd_kl_looped_kernel"}
    assert by_case["kd_kl bfloat16 4x262144"] == {"_kd_kl_stats_kernel", "_kd_kl_grad_kernel"}
    assert by_case["kd_kl bfloat16 256x8192"] == {"_kd_kl_fused_kernel"}
    # 64 row blocks at 4096 rows: the columns split, the partial statistics merged
    assert "_corr_fwd_merge_kernel" in by_case["correlation bfloat16 M=N=4096 Ds=128 Dt=128"]
    assert "_corr_fwd_merge_kernel" not in by_case["correlation bfloat16 M=N=16384 Ds=128 Dt=128"]
    # too wide for the fused kernels: the tiled path (cuBLAS tiles, then the tile kernels)
    tiled = {"_tile_stats_kernel", "_corr_fwd_merge_kernel", "_tile_grad_operands_kernel"}
    assert by_case["correlation bfloat16 M=N=4096 Ds=1024 Dt=2048"] == tiled
    assert by_case["correlation float32 M=N=4096 Ds=256 Dt=256"] == tiled
