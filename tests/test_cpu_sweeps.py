"""The compiled CPU sweeps (csrc/cpu/kl_sweeps.cpp) in each of their versions, and the KL's streaming
stores: AVX-512, AVX2 and scalar agree on the KL and on both correlation paths (rows of every tail
length, -inf and NaN entries), and a gradient large enough to be streamed (>= 64 MiB) is right, rows
off the 64-byte boundary included."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import require_backend
from mlkd_fast import reference

_SCRIPT = """
import sys, torch
from mlkd_fast import backends
torch.manual_seed(1)
native = backends.REGISTRY["native"]
out = {}
for n, c in [(3, 1), (5, 7), (4, 16), (6, 33), (9, 1271), (3, 2055)]:
    s = torch.randn(n, c) * 30
    t = torch.randn(n, c) * 30
    t[0, ::3] = float("-inf")
    if c > 5:
        s[1, 5] = float("nan")
    out[f"kl{n}x{c}"] = torch.ops.mlkd_fast.kd_kl(s, t, None, 2.0, True, True)
for path in ("dense", "tiled"):
    backends.CORRELATION_PATH = path
    for m, d in [(7, 5), (40, 300), (1100, 17)]:
        a = torch.randn(m, d, requires_grad=True)
        rows = native.correlation_rows(a, torch.randn(m, 3), None, None, 0.5, True)
        out[f"{path}{m}x{d}"] = (rows.detach(), torch.autograd.grad(rows.sum(), a)[0])
torch.save(out, sys.argv[1])
"""


def test_every_simd_version_matches_the_portable_one(tmp_path):
    require_backend("native", "cpu")
    results = {}
    for name, env in (("avx512", {}), ("avx2", {"MLKD_FAST_NO_AVX512": "1"}), ("scalar", {"MLKD_FAST_NO_SIMD": "1"})):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], check=True, env={**os.environ, **env})
        results[name] = torch.load(path)
    for name in ("avx512", "avx2"):
        for key, value in results[name].items():
            for a, b in zip(value, results["scalar"][key]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, equal_nan=True, msg=lambda m: f"{name} {key}: {m}")
    rows, grad_s, grad_t = results["avx512"]["kl9x1271"]
    assert torch.isnan(rows[1]) and torch.isfinite(rows[0]) and (grad_t[0, ::3] == 0).all()


@pytest.mark.parametrize("c", [8000, 8001])  # rows on and off the 64-byte boundary
def test_streamed_gradient_of_a_large_batch(c):
    """2100 x 8000 fp32: a 64 MiB gradient, written with streaming stores (kStreamOutputBytes)."""
    require_backend("native", "cpu")
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2100, c, generator=g), torch.randn(2100, c, generator=g)
    rows, grad, _ = torch.ops.mlkd_fast.kd_kl(s, t, None, 2.0, True, False)
    ref_rows = reference.kd_kl_rows(s, t, 2.0)
    torch.testing.assert_close(rows, ref_rows, rtol=1e-4, atol=1e-6)
    expected = 2.0 * (torch.softmax(s / 2.0, 1) - torch.softmax(t / 2.0, 1))
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-8)
