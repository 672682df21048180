"""Language-model distillation: the fused lm_head + divergence loss against what users run today (issue #36,
SPEC §9). fwd+bwd (the gradients of the student's hidden states and head), one group per
``linear_kd fwd+bwd <dtype> <teacher> <divergence> N=<tokens> H=<H> V=<V> <device>``.

Cases: (tokens, H, V) in {(1024, 1024, 32000), (4096, 1024, 128256)} for every provider and
(8192, 1024, 128256) for ``fused``, ``liger`` and ``gemms`` only (eager holds ~20 GB there: the issue's
rule); fp32 and bf16 inputs; the teacher live (its hidden states and head, no gradient) or as dense
logits; ``forward_kl`` and ``jsd`` (beta 0.5, TRL's generalised JSD); temperature 1, no labels (every
token counts, the loss is the per-token mean). Providers:

- ``fused``: ``mlkd_fast.functional.linear_kd_loss`` (backend ``auto``, chunk from its memory budget).
- ``eager``: the loss as users write it: logits ``h @ W.T`` in the input dtype, then ``.float()``, the
  teacher's under ``no_grad``, ``log_softmax`` and ``F.kl_div`` (forward KL) or TRL's
  ``generalized_jsd_loss`` (the mixture by ``logsumexp`` of the two log-probabilities).
- ``compile``: ``torch.compile`` of that same eager function.
- ``liger``: Liger-Kernel's chunked distillation loss (``LigerFusedLinearJSDLoss``: its compiled
  default, 1024-token chunks, hard-loss weight 0, soft weight 1; forward KL is its JSD at beta 0). It
  takes a live teacher only (the dense-logit cases skip) and is optional (``pip install liger-kernel``,
  the ``bench-lm`` extra): where it does not import or run, the case skips with the reason.
- ``gemms``: the floor: the same matmuls alone, in fp32, on the fused path's chunks (student logits,
  the live teacher's logits, the hidden states' gradient ``dz W`` and the head's ``dz^T h``: four with
  a live teacher, three with dense logits), into preallocated buffers, nothing else (the fp32 copies of
  bf16 inputs are made before the clock starts). On CUDA bf16 operands with fp32 results, as the
  fused path runs them.

Per case ``extra_info`` holds the shape, ``flops`` (2 N V H per matmul counted above), ``peak_extra_mib``
and how it was measured, the load averages before and after the case, and (added when the module's
cases finish) ``vs_eager``, ``vs_compile``, ``vs_liger``, ``vs_gemms``: the other provider's median over
this one's in the same run, > 1 meaning this one is faster (``vs_gemms`` < 1 always: the fraction of the
floor reached).

Peak extra memory. CUDA: ``max_memory_allocated`` over what the inputs hold. CPU: each case runs once
more in a fresh child process (``--peak``; glibc's mmap threshold fixed at 64 KiB so that freed
buffers go back to the system): it builds the inputs, compiles what the provider compiles (below), resets
the kernel's resident high-water mark (``/proc/self/clear_refs``), runs one fwd+bwd and reports
``VmHWM`` minus the resident size before the call: the pages the call touched beyond its inputs,
its outputs (the gradients) included, compilation excluded. Compilation is never timed either:
``compile`` and ``liger`` run one whole call first, ``fused`` one call on its first chunk of tokens
(its CPU row math is inductor-compiled per chunk shape), each with a fresh dynamo cache per case. Guard: the child (and the timed call in
this process) runs under an ``RLIMIT_DATA`` soft limit of what the machine has available less 2 GiB,
so a case that would not fit fails its allocation and skips with the reason instead of waking the
OOM killer; a case whose measured peak does not fit what is available now is not timed.

Run: ``python -m pytest benchmarks/test_bench_lm.py -p no:cacheprovider --benchmark-json
benchmarks/results/lm_cpu.json``, then ``python -m benchmarks.report_lm benchmarks/results/lm_cpu.json
--out benchmarks/results`` (the table into benchmarks/results/lm_cpu.md and docs/benchmarks.md). Cost on the
2-core machine: a call is 3 or 4 matmuls of 2 N V H flops, 4.3 TFLOP with a live teacher at
4096 x 1024 x 128256 (8.6 at 8192), ~25 s at the ~180 GFLOP/s fp32 it reaches quiet and longer for the
non-GEMM work; 36 cases at 4096 and 20 at 8192, each timed ROUNDS times plus one memory call (plus a
compilation for compile and liger): about 2 hours quiet with ``MLKD_BENCH_LM_ROUNDS=1``, far more
under load. Select with ``-k`` (ids ``cpu-<dtype>-<teacher>-<divergence>-N<n>-H<h>-V<v>-<provider>``)
to run it in parts and pass every part's JSON to the report. ``MLKD_BENCH_LM_ROUNDS`` (default 3) sets the
timed rounds. On CUDA (benchmarks/gpu_pass.sh) the cases are bf16 (8192, 4096, 128256), live teacher,
JSD: fused, liger and gemms, beside a bf16 matmul roofline. ``MLKD_BENCH_TINY=1`` shrinks everything
(CI: tests/test_bench_lm_tiny.py); there compile and Liger's compilation run only with
``MLKD_BENCH_COMPILE=1`` (Liger uncompiled otherwise) and memory is not measured unless
``MLKD_BENCH_LM_MEMORY`` is ``inprocess`` (the same high-water reading in this process) or ``subprocess``.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # the --peak child runs this file as a script
    sys.path.insert(0, ROOT)

from mlkd_fast import functional as MF  # noqa: E402
from mlkd_fast.linear_kd import default_chunk_size  # noqa: E402

TINY = os.environ.get("MLKD_BENCH_TINY") == "1"
HAS_CUDA = torch.cuda.is_available()
BETA = 0.5
PROVIDERS = ["fused", "eager", "compile", "liger", "gemms"]
DIVERGENCES = ["forward_kl", "jsd"]
TEACHERS = ["live", "dense"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (tokens, H, V, every provider?): the largest shape is for the chunked providers only (eager ~20 GB)
CPU_SHAPES = ([(64, 32, 320, True), (96, 32, 384, False)] if TINY else
              [(1024, 1024, 32000, True), (4096, 1024, 128256, True), (8192, 1024, 128256, False)])
CUDA_SHAPES = [(64, 32, 320, False)] if TINY else [(8192, 4096, 128256, False)]
CHUNKED_ONLY = ("fused", "liger", "gemms")
ROUNDS = 1 if TINY else int(os.environ.get("MLKD_BENCH_LM_ROUNDS", "3"))
COMPILE_IN_TINY = os.environ.get("MLKD_BENCH_COMPILE") == "1"
MEMORY = os.environ.get("MLKD_BENCH_LM_MEMORY", "off" if TINY else "subprocess")  # or "inprocess"
RESERVE = 2 << 30  # what a case must leave the machine
# MLKD_BENCH_SET as in test_bench_losses.py: the LM cases belong to "rest" (gpu_pass.sh part 2) and "all"
BENCH_SET = os.environ.get("MLKD_BENCH_SET", "all")


def _cases() -> list[tuple]:
    cases = []
    if BENCH_SET == "headline":
        return cases
    for n, h, v, every in CPU_SHAPES:
        for dtype in DTYPES:
            for teacher in TEACHERS:
                for div in DIVERGENCES:
                    if TINY and not every and (dtype, teacher, div) != ("float32", "live", "jsd"):
                        continue  # the tiny run's chunked-only shape: one case is enough to exercise the rule
                    cases.append(("cpu", n, h, v, every, dtype, teacher, div))
    if HAS_CUDA:
        for n, h, v, every in CUDA_SHAPES:
            cases.append(("cuda", n, h, v, every, "bfloat16", "live", "jsd"))
    return cases


def _case_id(c: tuple) -> str:
    device, n, h, v, _, dtype, teacher, div = c
    return f"{device}-{dtype}-{teacher}-{div}-N{n}-H{h}-V{v}"


def skip_reason(provider: str, device: str, every: bool, teacher: str) -> str | None:
    """Why a provider is not timed at a case (before anything is imported or allocated), or None."""
    if not every and provider not in CHUNKED_ONLY:
        return ("eager / torch.compile are not timed at this shape (the issue's rule: materialised logits need "
                "~20 GB at 8192 x 128256); the chunked providers are")
    if device == "cuda" and provider not in CHUNKED_ONLY:
        return "the GPU step times fused, liger and gemms only (gpu_pass.sh's budget)"
    if provider == "liger" and teacher != "live":
        return "Liger-Kernel's chunked distillation loss takes the teacher live only (hidden states and head)"
    if provider == "compile" and TINY and device == "cpu" and not COMPILE_IN_TINY:
        return "torch.compile is left out of the tiny CPU run (set MLKD_BENCH_COMPILE=1)"
    return None


def liger_status() -> str | None:
    """None when Liger-Kernel's chunked JSD imports here, else why not."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return f"Liger-Kernel is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); " \
               "pip install liger-kernel (the bench-lm extra)"
    return None


# ---------------------------------------------------------------------------------------------
# the losses
# ---------------------------------------------------------------------------------------------
def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` (temperature 1, no labels) on (tokens, V) logits, the mean per token."""
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum() / jsd.shape[0]


def eager_loss(h_s, w_s, h_t, w_t, z_t, divergence: str) -> torch.Tensor:
    """The distillation loss as users write it: materialised logits in the input dtype, then fp32."""
    z_s = (h_s @ w_s.t()).float()
    if z_t is None:
        with torch.no_grad():
            z_t = (h_t @ w_t.t()).float()
    else:
        z_t = z_t.float()
    if divergence == "forward_kl":
        return F.kl_div(F.log_softmax(z_s, dim=-1), F.log_softmax(z_t, dim=-1), log_target=True,
                        reduction="batchmean")
    return generalized_jsd(z_s, z_t, BETA)


def make_inputs(device: str, n: int, h: int, v: int, dtype: str, teacher: str) -> dict:
    """The case's tensors, seeded: logits of unit scale (W ~ N(0, 1/H))."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = DTYPES[dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    x = {"h_s": randn(n, h).requires_grad_(), "w_s": randn(v, h, scale=h ** -0.5).requires_grad_(),
         "h_t": None, "w_t": None, "z_t": None, "labels": torch.randint(0, v, (n,), generator=g, device=device)}
    if teacher == "live":
        x["h_t"], x["w_t"] = randn(n, h), randn(v, h, scale=h ** -0.5)
    else:
        x["z_t"] = randn(n, v)
    return x


def build_step(provider: str, device: str, x: dict, divergence: str):
    """A no-argument fwd+bwd of ``provider`` on inputs ``x`` (returns the gradients)."""
    wrt = [x["h_s"], x["w_s"]]
    if provider == "fused":
        # its CPU rows are inductor-compiled per configuration: a fresh dynamo cache per case, so that the
        # recompile limit never sends a later case to the eager rows (warm_up compiles before any clock)
        torch._dynamo.reset()

        def step():
            loss = MF.linear_kd_loss(x["h_s"], x["w_s"], teacher_hidden=x["h_t"], teacher_weight=x["w_t"],
                                     teacher_logits=x["z_t"], divergence=divergence, beta=BETA)
            return torch.autograd.grad(loss, wrt)
        return step
    if provider in ("eager", "compile"):
        if provider == "compile":
            torch._dynamo.reset()  # a fresh cache per case: the recompile limit never falls back to eager
        fn = torch.compile(eager_loss) if provider == "compile" else eager_loss

        def step():
            return torch.autograd.grad(fn(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["z_t"], divergence), wrt)
        return step
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        torch._dynamo.reset()
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                          beta=0.0 if divergence == "forward_kl" else BETA, temperature=1.0,
                                          compiled=not TINY or COMPILE_IN_TINY)

        def step():
            return torch.autograd.grad(loss_fn(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"]), wrt)
        return step
    if provider == "gemms":
        return gemm_step(device, x)
    raise ValueError(provider)


def gemm_step(device: str, x: dict):
    """The fused path's matmuls alone, on its chunks, into preallocated buffers (the floor)."""
    n, hdim = x["h_s"].shape
    v = x["w_s"].shape[0]
    chunk = default_chunk_size(n, v, device)
    live = x["h_t"] is not None
    native = device == "cuda" and x["h_s"].dtype != torch.float32
    op = (lambda t: t.detach()) if native else (lambda t: t.detach().float().contiguous())
    h, w = op(x["h_s"]), op(x["w_s"])
    ht, wt = (op(x["h_t"]), op(x["w_t"])) if live else (None, None)
    z = None if native else torch.empty(chunk, v, device=device)
    zt = torch.empty(chunk, v, device=device) if live and not native else None
    dz = torch.randn(chunk, v, device=device).to(h.dtype)
    dh = torch.empty(n, hdim, device=device)
    dw = torch.zeros(v, hdim, device=device)

    def step():
        dw.zero_()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc, g = h[s:e], dz[:e - s]
            if native:  # bf16 operands, fp32 results, as the fused path calls cuBLAS
                torch.mm(hc, w.t(), out_dtype=torch.float32)
                if live:
                    torch.mm(ht[s:e], wt.t(), out_dtype=torch.float32)
                dh[s:e] = torch.mm(g, w, out_dtype=torch.float32)
                dw.add_(torch.mm(g.t(), hc, out_dtype=torch.float32))
            else:
                torch.mm(hc, w.t(), out=z[:e - s])
                if live:
                    torch.mm(ht[s:e], wt.t(), out=zt[:e - s])
                torch.mm(g, w, out=dh[s:e])
                dw.addmm_(g.t(), hc)
        return dh, dw
    return step


# ---------------------------------------------------------------------------------------------
# memory: the guard and the measurement
# ---------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info["MemFree"])


class MemoryGuard:
    """An RLIMIT_DATA soft limit of what this process holds plus ``extra`` bytes (default: what the
    machine has available less :data:`RESERVE`): an allocation past it fails with an error instead of
    the OOM killer ending some process on the machine. The previous limit comes back on exit."""

    def __init__(self, extra: int | None = None) -> None:
        self.extra = extra

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_DATA)
        data = _status_kib("VmData")
        extra = self.extra if self.extra is not None else available_bytes() - RESERVE
        self.limit = None
        if data is not None:
            self.limit = data * 1024 + max(extra, 0)
            hard = self.old[1]
            if hard != resource.RLIM_INFINITY:
                self.limit = min(self.limit, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (self.limit, hard))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_DATA, self.old)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_of_call(step) -> dict:
    """Runs ``step`` once and returns the resident high-water growth over the resident size before it
    (Linux: clear_refs 5 resets VmHWM to VmRSS), in MiB, and the call's seconds."""
    gc.collect()
    if not _reset_hwm():
        t0 = time.perf_counter()
        step()
        return {"peak_extra_mib": None, "memory_method": "unavailable (no /proc/self/clear_refs)",
                "memory_call_s": time.perf_counter() - t0}
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = step()
    seconds = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    del out
    return {"peak_extra_mib": (hwm - base) / 1024, "memory_call_s": seconds}


def is_compiled(provider: str) -> bool:
    return provider == "compile" or (provider == "liger" and (not TINY or COMPILE_IN_TINY))


def warm_up(provider: str, device: str, x: dict, divergence: str, step) -> float:
    """Compiles what the provider compiles before anything is timed or measured; returns its seconds.
    compile and liger: one whole call (their graphs depend on the token count). fused: one call on the
    first chunk of tokens (its rows are compiled per chunk shape on CPU: linear_kd.COMPILE_MIN_ENTRIES),
    1/chunks of a call. Others: nothing."""
    t0 = time.perf_counter()
    if is_compiled(provider):
        step()
    elif provider == "fused":
        chunk = default_chunk_size(x["h_s"].shape[0], x["w_s"].shape[0], device)
        part = {k: (None if t is None else t[:chunk]) for k, t in x.items() if k in ("h_t", "z_t")}
        loss = MF.linear_kd_loss(x["h_s"][:chunk], x["w_s"], teacher_hidden=part["h_t"], teacher_weight=x["w_t"],
                                 teacher_logits=part["z_t"], divergence=divergence, beta=BETA)
        torch.autograd.grad(loss, [x["h_s"], x["w_s"]])
    else:
        return 0.0
    return time.perf_counter() - t0


def measure_peak(provider: str, device: str, n: int, h: int, v: int, dtype: str, teacher: str, divergence: str
                 ) -> dict:
    """The case's peak extra memory in this process (warm-up first for the compiled providers)."""
    x = make_inputs(device, n, h, v, dtype, teacher)
    step = build_step(provider, device, x, divergence)
    warm_up(provider, device, x, divergence, step)
    return peak_of_call(step)


def peak_in_child(provider: str, device: str, n: int, h: int, v: int, dtype: str, teacher: str, divergence: str,
                  timeout: float = 1800) -> dict:
    """:func:`measure_peak` in a fresh process under the memory guard; {"error": ...} when it fails."""
    args = json.dumps(dict(provider=provider, device=device, n=n, h=h, v=v, dtype=dtype, teacher=teacher,
                           divergence=divergence, limit=available_bytes() - RESERVE))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    try:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak", args], capture_output=True,
                             text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"the memory run took over {timeout:.0f} s"}
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the memory run failed (exit {res.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def _child(argv: list[str]) -> None:
    a = json.loads(argv[argv.index("--peak") + 1])
    limit = a.pop("limit")
    try:
        with MemoryGuard(max(limit, 0)):
            out = measure_peak(**a)
    except (RuntimeError, MemoryError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        out = {"error": f"does not fit the memory available ({limit / 2 ** 30:.1f} GiB above the inputs' "
                        f"process): {msg[:200]}"}
    out["memory_method"] = out.get("memory_method", "child process, VmHWM - VmRSS after clear_refs, "
                                                    "MALLOC_MMAP_THRESHOLD_=65536")
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@pytest.fixture(scope="module", autouse=True)
def _ratios(request):
    """When the module's cases are done: each case's ratios to eager, compile, liger and gemms of
    its group (same run), written into its extra_info before pytest-benchmark saves the JSON."""
    yield
    session = getattr(request.config, "_benchmarksession", None)
    if session is None:
        return
    groups: dict = {}
    for b in session.benchmarks:
        if b.extra_info.get("op") == "linear_kd" and b.stats:
            groups.setdefault(b.group, {})[b.extra_info["provider"]] = b
    for members in groups.values():
        for b in members.values():
            for other in ("eager", "compile", "liger", "gemms"):
                if other in members and other != b.extra_info["provider"]:
                    b.extra_info[f"vs_{other}"] = members[other].stats.median / b.stats.median


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_linear_kd(benchmark, provider, case):
    device, n, h, v, every, dtype, teacher, divergence = case
    reason = skip_reason(provider, device, every, teacher)
    if reason:
        pytest.skip(reason)
    if provider == "liger":
        reason = liger_status()
        if reason:
            pytest.skip(reason)
    live = teacher == "live"
    matmuls = 4 if live else 3
    benchmark.group = f"linear_kd fwd+bwd {dtype} {teacher} {divergence} N={n} H={h} V={v} {device}"
    benchmark.extra_info.update(op="linear_kd", pass_="fwd+bwd", provider=provider, device=device, n=n, h=h, v=v,
                                dtype=dtype, teacher=teacher, divergence=divergence, beta=BETA,
                                flops=matmuls * 2 * n * v * h, matmuls=matmuls,
                                chunk=default_chunk_size(n, v, device), load_before=_load())
    if provider == "liger":
        benchmark.extra_info["liger_compiled"] = is_compiled("liger")
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    elif MEMORY == "subprocess":
        mem = peak_in_child(provider, device, n, h, v, dtype, teacher, divergence)
        benchmark.extra_info.update({k: val for k, val in mem.items() if k != "error"})
        if "error" in mem:
            pytest.skip(mem["error"])
        need = mem["peak_extra_mib"] * 2 ** 20 * 1.15 + RESERVE
        avail = available_bytes()
        if need > avail:
            pytest.skip(f"not timed: its measured peak ({mem['peak_extra_mib']:.0f} MiB) does not fit what the "
                        f"machine has available now ({avail / 2 ** 20:.0f} MiB, {RESERVE >> 20} MiB kept free)")
    x = make_inputs(device, n, h, v, dtype, teacher)
    try:
        step = build_step(provider, device, x, divergence)
    except Exception as exc:  # noqa: BLE001 - an optional provider that cannot run here skips with the reason
        if provider != "liger":
            raise
        pytest.skip(f"Liger-Kernel cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    def synced():
        out = step()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    try:
        with MemoryGuard():
            if device == "cuda":
                synced()  # warm-up (compilation, autotuning)
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                synced()
                benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
                benchmark.extra_info["memory_method"] = "torch.cuda.max_memory_allocated over the inputs"
                from triton.testing import do_bench

                benchmark.extra_info["device_median_ms"] = do_bench(step, warmup=25, rep=200, return_mode="median")
            else:
                if MEMORY == "inprocess":
                    benchmark.extra_info.update(measure_peak(provider, device, n, h, v, dtype, teacher, divergence))
                    benchmark.extra_info["memory_method"] = benchmark.extra_info.get(
                        "memory_method", "in-process VmHWM - VmRSS after clear_refs (tiny run)")
                warm = warm_up(provider, device, x, divergence, synced)  # compilation is not timed
                if warm:
                    benchmark.extra_info["warm_up_s"] = warm
            benchmark.pedantic(synced, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    except (RuntimeError, MemoryError) as exc:
        text = str(exc)
        if "allocate" not in text and "memory" not in text.lower() and not isinstance(exc, MemoryError):
            if provider != "liger":
                raise
            pytest.skip(f"Liger-Kernel cannot run here: {type(exc).__name__}: {text.splitlines()[0][:200]}")
        pytest.skip(f"out of memory under the guard: {text.splitlines()[0][:200] if text else 'MemoryError'}")
    finally:
        benchmark.extra_info["load_after"] = _load()


@pytest.mark.skipif(not HAS_CUDA, reason="the bf16 matmul roofline is for the GPU step")
def test_linear_kd_roofline_matmul(benchmark):
    """bf16 matmul peak in the same run (the fused path's fraction of it, SPEC §9's GPU target)."""
    if BENCH_SET == "headline":
        pytest.skip("not in the headline set")
    n = 256 if TINY else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    benchmark.group = "linear_kd roofline matmul cuda"
    benchmark.extra_info.update(op="linear_kd_matmul", provider="torch", device="cuda", n=n, dtype="bfloat16",
                                flops=2 * n ** 3)
    from triton.testing import do_bench

    benchmark.extra_info["device_median_ms"] = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")

    def synced():
        a @ b
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)


if __name__ == "__main__" and "--peak" in sys.argv:
    _child(sys.argv)
