"""Compiles every Triton kernel of mlkd_fast for a GPU target, on a machine without a GPU.

The interpreter that runs the Triton kernels in CI checks their arithmetic, not whether the real
compiler accepts them or what they cost on chip. This tool runs each launcher on ``meta`` tensors of
the docs/design.md §5 shapes (and the odd ones of the tests) with Triton's active driver replaced by one that
only names a target (default sm_90, an H100): every ``kernel[grid](...)`` is compiled, not launched,
through Triton's own binder (the same specialisation and options a GPU run gets), down to a cubin.
ptxas then reports registers, spills and shared memory per compiled variant.

    python -m tools.triton_build [--arch 90] [--json F] [--md F]

It must run in a process without TRITON_INTERPRET (the kernels must be compiled ``JITFunction``s);
tests/test_triton_build.py runs it so, and fails on a compile error, too much shared memory or a
spill. The planners (``mlkd_fast.kernels.sm_count``) see a non-CUDA device and plan as for an H100 (132 SMs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

# Per-block shared memory a kernel may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90)
LAUNCHES: list = []  # (kernel name, grid, compiled kernel) of the launches since the last clear


def _install_compile_only_driver(arch: int) -> None:
    """Every JITFunction launch compiles for ``arch`` and records the result instead of launching."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("meta")

    driver.set_active(CompileOnlyDriver())
    compile_only = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = compile_only(self, *args, grid=grid, warmup=True, **kwargs)
        LAUNCHES.append((self.fn.__name__, tuple(grid), kernel))
        return kernel

    JITFunction.run = run



def _cases() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, launcher call) covering every kernel variant the launchers pick at the docs/design.md §5 shapes and
    at the widths and paths in between, on meta tensors (nothing is allocated)."""
    import torch

    from mlkd_fast.kernels import correlation, kd_kl, linear_kd

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        # fused (small and widest row), looped (many long rows), split (few long rows)
        shapes = ((1024, 1000), (256, 8192), (8192, 32000), (4, 262144)) if dtype != torch.float16 else ((1024, 1000),)
        for n, c in shapes:
            s, t, w = meta(n, c, dtype=dtype), meta(n, c, dtype=dtype), meta(n)
            yield f"kd_kl {name} {n}x{c}", lambda s=s, t=t: kd_kl._launch_kd_kl(s, t, None, 4.0, True, False)
            yield (f"kd_kl {name} {n}x{c}, teacher grad, row weights",
                   lambda s=s, t=t, w=w: kd_kl._launch_kd_kl(s, t, w, 4.0, True, True))
        if dtype != torch.float16:
            x, g = meta(8192, 32000, dtype=dtype), meta(8192)
            yield f"scale_rows {name} 8192x32000", lambda x=x, g=g: kd_kl._launch_scale_rows(x, g, inplace=False)
            yield f"scale_rows_ {name} 8192x32000", lambda x=x, g=g: kd_kl._launch_scale_rows(x, g, inplace=True)

        # every row of the fused-kernel table, mixed widths, and widths beyond it (the tiled path)
        widths = (((64, 64), (128, 100), (128, 128), (256, 256)) if dtype == torch.float32 else
                  ((128, 128), (256, 256), (512, 512), (37, 300), (1024, 2048)) if dtype == torch.bfloat16 else
                  ((128, 128),))
        for ds, dt in widths:
            for m in ((4096, 16384) if (dtype, ds) == (torch.bfloat16, 128) else (4096,)):
                a_s, a_t, g = meta(m, ds, dtype=dtype), meta(m, dt, dtype=dtype), meta(m)
                yield (f"correlation {name} M=N={m} Ds={ds} Dt={dt}",
                       lambda a_s=a_s, a_t=a_t, g=g: (correlation._launch_fwd(a_s, a_t, None, None, 0.5, True),
                                                      correlation._launch_bwd(g, a_s, a_t, None, None, g, g, 0.5, True)))
        if dtype == torch.bfloat16:
            a_s, a_t, b_s, b_t, g = (meta(3072, 128, dtype=dtype), meta(3072, 128, dtype=dtype),
                                     meta(1024, 128, dtype=dtype), meta(1024, 128, dtype=dtype), meta(3072))
            yield ("correlation bfloat16 3072x1024 Ds=Dt=128 (rectangular)",
                   lambda: (correlation._launch_fwd(a_s, a_t, b_s, b_t, 0.5, False),
                            correlation._launch_bwd(g, a_s, a_t, b_s, b_t, g, g, 0.5, False)))

    # linear_kd's row kernel (fp32 chunk logits): every divergence with labels and softcaps and the
    # gradient, at a Llama-3 chunk (1024 rows x 128256, vocab='shared' over 128000 ids); the forward KL
    # plain, the rows without the gradient, and CE alone (no teacher)
    n, v_s, v = 1024, 128256, 128000
    z_s, z_t, w, lab = meta(n, v_s), meta(n, v_s), meta(n), meta(n, dtype=torch.int64)
    for div, coef in (("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.5), ("skew_forward_kl", 0.1),
                      ("skew_reverse_kl", 0.1)):
        yield (f"linear_kd rows {div} {n}x{v_s}, labels, softcaps, grad",
               lambda div=div, coef=coef: linear_kd._launch(z_s, z_t, lab, w, w, div, coef, 2.0, 30.0, 50.0, v, True))
    yield (f"linear_kd rows forward_kl {n}x{v_s}, plain, grad",
           lambda: linear_kd._launch(z_s, z_t, None, w, w, "forward_kl", 0.0, 1.0, 0.0, 0.0, v_s, True))
    yield (f"linear_kd rows jsd {n}x{v_s}, no grad",
           lambda: linear_kd._launch(z_s, z_t, None, w, w, "jsd", 0.5, 1.0, 0.0, 0.0, v_s, False))
    yield (f"linear_kd rows CE only {n}x{v_s}, grad",
           lambda: linear_kd._launch(z_s, None, lab, w, w, "forward_kl", 0.0, 1.0, 0.0, 0.0, v_s, True))


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and static shared memory of one kernel, from ptxas -v (the options
    Triton itself passes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}",
                              src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame")}


def build(arch: int) -> dict:
    """Compiles every case for ``arch``; returns the per-variant report (errors included, not raised)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile the kernels")
    _install_compile_only_driver(arch)
    import torch
    import triton

    variants: dict[str, dict] = {}
    errors = []
    start = time.perf_counter()
    for label, call in _cases():
        LAUNCHES.clear()
        try:
            call()
        except Exception as err:  # a compile error names the case and goes on with the others
            errors.append({"case": label, "error": f"{type(err).__name__}: {err}"[:2000]})
            continue
        for name, grid, kernel in LAUNCHES:
            meta = kernel.metadata
            entry = variants.get(kernel.hash)
            if entry is None:
                names = kernel.src.fn.arg_names
                constexprs = {names[path[0]]: value for path, value in kernel.src.constants.items()
                              if len(path) == 1 and names[path[0]].isupper()}
                entry = variants[kernel.hash] = {
                    "kernel": name, "constexprs": constexprs,
                    "num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared": meta.shared,
                    **_ptxas_report(kernel.asm["ptx"], arch), "cases": [], "grids": []}
                threads = 32 * meta.num_warps
                entry["blocks_per_sm_by_registers"] = REGISTER_FILE // max(threads * max(entry["registers"], 1), 1)
            entry["cases"].append(label)
            entry["grids"].append(list(grid))
            if meta.shared > SHARED_LIMIT.get(arch, 0):  # a GPU refuses the launch (OutOfResources)
                errors.append({"case": label, "error": f"{name}: {meta.shared} bytes of shared memory, "
                                                       f"the sm_{arch} limit is {SHARED_LIMIT.get(arch)}"})
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"arch": arch, "triton": triton.__version__, "torch": torch.__version__, "commit": commit,
            "shared_limit": SHARED_LIMIT.get(arch), "seconds": round(time.perf_counter() - start, 1),
            "errors": errors, "variants": sorted(variants.values(), key=lambda v: (v["kernel"], v["shared"]))}


def markdown(report: dict) -> str:
    lines = [f"Triton kernels compiled for sm_{report['arch']} without a GPU (`python -m tools.triton_build`), "
             f"triton {report['triton']}, torch {report['torch']}, commit {report['commit']}; "
             f"{len(report['variants'])} variants, "
             f"{len(report['errors'])} errors, {report['seconds']} s.", "",
             "| kernel | constexprs | warps | stages | registers | spill st/ld B | shared B | blocks/SM (regs) | first case |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        consts = ", ".join(f"{k}={v2}" for k, v2 in v["constexprs"].items())
        lines.append(f"| {v['kernel']} | {consts} | {v['num_warps']} | {v['num_stages']} | {v['registers']} | "
                     f"{v['spill_stores']}/{v['spill_loads']} | {v['shared']} | {v['blocks_per_sm_by_registers']} | "
                     f"{v['cases'][0]} |")
    for e in report["errors"]:
        lines.append(f"\n**{e['case']}**: {e['error']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100/H200)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--md", help="write a markdown table here")
    args = parser.parse_args(argv)
    report = build(args.arch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)  # constexprs may be Triton dtypes
    text = markdown(report)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
