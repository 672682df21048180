"""Peak extra memory of the native CPU correlation fwd+bwd at M = N = 32768, D = 128 (docs/design.md §5).

Run: ``python benchmarks/corr_memory_cpu.py [N] > benchmarks/results/corr_memory_cpu.json``.
Peak RSS growth (resource.getrusage) over the inputs already allocated; eager would need 4 GiB per
(N x N) fp32 matrix and several of them.
"""
import json
import resource
import sys
import time

import torch

from mlkd_fast import functional as MF

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
d = 128
a_s = torch.randn(n, d, requires_grad=True)
a_t = torch.randn(n, d)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
start = time.perf_counter()
loss = MF.correlation_kl(a_s, a_t, backend="native")
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"op": "correlation fwd+bwd", "backend": "native", "device": "cpu", "m": n, "n": n, "d": d,
                  "dtype": "float32", "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
                  "extra_peak_rss_mib": round((peak - base) / 1024, 1), "loss": float(loss.detach()),
                  "torch": torch.__version__}, indent=2))
