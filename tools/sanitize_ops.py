"""A small run of every native CUDA op for compute-sanitizer (memcheck, racecheck): odd shapes,
masks, teacher gradient, rectangular correlation. Run by benchmarks/gpu_pass.sh."""
import torch

import mlkd_fast
from mlkd_fast import functional as MF

assert mlkd_fast.available_backends("cuda")["native"], mlkd_fast.available_backends("cuda")["native"].reason
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n, c in ((37, 1271), (3, 70001), (5, 8)):
        s = torch.randn(n, c, device="cuda", dtype=dtype, requires_grad=True)
        t = torch.randn(n, c, device="cuda", dtype=dtype, requires_grad=True)
        mask = torch.rand(n, device="cuda") > 0.3
        loss = MF.kd_kl_div(s, t, 2.0, row_mask=mask, backend="native", weight=0.5)
        (2.0 * loss).backward(retain_graph=True)  # scale_rows (out of place)
        (3.0 * loss).backward()  # scale_rows_ (in place)
        MF.kd_kl_div(s, t, 2.0, backend="native").backward()  # scale_rows_, every row skipped
    # fp16/bf16 correlation runs the fused tensor-core kernels: aligned (40, 24) and scalar (37)
    # loads, wide features (300: two output blocks per row block), rectangular, and columns split over
    # blocks (few rows, >= 512 columns).
    for m, n, d in ((150, 150, 40), (96, 32, 24), (70, 70, 37), (130, 130, 300), (40, 600, 64), (600, 600, 37)):
        a_s = torch.randn(m, d, device="cuda", dtype=dtype, requires_grad=True)
        a_t = torch.randn(m, d + 8, device="cuda", dtype=dtype)
        if m == n:
            MF.correlation_kl(a_s, a_t, backend="native").backward()
        else:
            b_s = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
            b_t = torch.randn(n, d + 8, device="cuda", dtype=dtype)
            MF.correlation_kl(a_s, a_t, b_s, b_t, backend="native").backward()
torch.cuda.synchronize()
print("sanitize_ops: done")
