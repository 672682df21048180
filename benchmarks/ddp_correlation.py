"""The global-batch correlation under DDP: every process computing the whole global matrix (the
all-gathered features as rows and columns) against each process computing only its own rows
against the all-gathered columns (what ``MLKDLoss(correlation_gather=...)`` does).

Run (CPU, gloo, one thread per process):
``OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/ddp_correlation.py --out benchmarks/results/ddp_correlation_cpu.json``
(on GPUs: NCCL, one GPU per process). Times are medians of fwd+bwd over 5 steps, between barriers.
"""
import argparse
import json
import os
import subprocess
import time

import torch
import torch.distributed as dist

from mlkd_fast import functional as MF
from mlkd_fast.train.distributed import gather_with_grad, shutdown_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="rows per process (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=128, help="feature width D (default: %(default)s)")
    parser.add_argument("--backend", default="auto", help="correlation backend (default: %(default)s)")
    parser.add_argument("--out", help="JSON file written by rank 0 (default: print only)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(rank)
    x = torch.randn(args.rows, args.dim, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(args.rows, args.dim, device=device, dtype=dtype)

    def whole() -> torch.Tensor:
        return MF.correlation_kl(gather_with_grad(x), gather_with_grad(t), backend=args.backend)

    def own_rows() -> torch.Tensor:
        return MF.correlation_kl(x, t, gather_with_grad(x), gather_with_grad(t), cols_start_with_rows=True,
                                 backend=args.backend)

    result = {"world": world, "rows_per_process": args.rows, "global_batch": world * args.rows, "d": args.dim,
              "dtype": str(dtype)[6:], "device": torch.cuda.get_device_name() if cuda else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "backend": args.backend,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
              "median_ms": {}}
    for name, fn in (("whole_matrix_per_process", whole), ("own_rows_per_process", own_rows)):
        fn().backward()  # warm-up
        times = []
        for _ in range(5):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn().backward()
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            times.append(time.perf_counter() - start)
        result["median_ms"][name] = round(sorted(times)[len(times) // 2] * 1e3, 2)
    result["speedup"] = round(result["median_ms"]["whole_matrix_per_process"] / result["median_ms"]["own_rows_per_process"], 2)
    if rank == 0:
        print(json.dumps(result, indent=2), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    del x, t, whole, own_rows
    shutdown_distributed(wait_for_all=True)


if __name__ == "__main__":
    main()
