#!/usr/bin/env bash
# The GPU pass: two commands, each under 8 minutes on one H200, the most important evidence first.
#
#   benchmarks/gpu_pass.sh 1 OUT   environment; install (the carried prebuilt library when it matches
#                                  the sources, else a forced build); every CUDA correctness test;
#                                  linear_kd's Triton row kernel compiled (its own stage, lm-triton);
#                                  the headline timings (KL bf16 fwd+bwd at the three GPU shapes,
#                                  correlation bf16 D = 128 at M = N = 16384 and 65536, the copy
#                                  bandwidth and bf16 matmul peak measured in the same run)
#   benchmarks/gpu_pass.sh 2 OUT   the ResNet-34 -> ResNet-18 training-step figure, cached vs live teacher
#                                  images/s (benchmarks/teacher_cache.py, in part2.log), compute-sanitizer
#                                  (memcheck, racecheck) where the runtime allows it, the
#                                  torch.compile tests, the LM distillation step (stage lm:
#                                  benchmarks/test_bench_lm.py, bf16 8192 x 4096 x 128256, live
#                                  teacher, JSD: fused vs Liger's chunked loss vs the GEMMs alone
#                                  and a bf16 matmul roofline; its JSON and table in part2.log), the
#                                  remaining benchmark shapes, the distiller zoo's losses beside
#                                  their eager twins
#
# Prepare on the development machine: `tools/prebuild_native.sh` (the library for the GPU machine's
# torch, into prebuilt/) and, to compare with Liger-Kernel, its wheel in benchmarks/wheels/. Run with
# carry = ["prebuilt", "benchmarks/wheels"]. Every stage has its own time limit inside the part's
# budget (MLKD_GPU_PASS_BUDGET_S, default 470 s); an overrunning stage is stopped with SIGINT, so
# pytest still writes the results of what finished, and the next stage runs. Files under OUT (flat,
# at most 5 a part): partN.log (every stage's output), partN_summary.txt (one line a stage),
# partN_tests.xml (JUnit), partN_bench.json (pytest-benchmark), train_throughput.json (part 2).
#
# Without a GPU the same script is a dry run: the CUDA tests skip, the benchmarks run at tiny CPU
# sizes, the training step runs tiny, the sanitizer is skipped (CI runs it so: tools/rehearse_device.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SELF=benchmarks/gpu_pass.sh

if [ "${1:-}" = stage ]; then  # internal: one stage's body, run by the part under `timeout`
  NAME=$2 OUT=$3 PART=$4 GPU=$5
  DEV=cpu TINY=1
  if [ "$GPU" = 1 ]; then DEV=cuda TINY=0; fi
  WORKERS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
  case $NAME in
    env)
      date -u +%FT%TZ; git rev-parse HEAD 2> /dev/null || echo "commit: not a git checkout"
      echo "kernel: $(uname -r)"; nproc
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
      nvcc --version 2>&1 | tail -2
      $PY -c 'import sys, torch, numpy; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "numpy", numpy.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
      $PY -c 'import triton; print("triton", triton.__version__)' ;;
    install)
      want=$(tools/source_hash.sh)
      torch_version=$($PY -c 'import torch; print(torch.__version__)')
      if [ -f prebuilt/_C.so ] && [ "$(cat prebuilt/SOURCE_HASH 2> /dev/null)" = "$want" ] \
         && [ "$(cat prebuilt/TORCH_VERSION 2> /dev/null)" = "$torch_version" ]; then
        echo "install: the carried prebuilt library (sources $want, torch $torch_version)"
        cp prebuilt/_C.so mlkd_fast/_C.so
        MLKD_FAST_SKIP_NATIVE=1 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . || exit 1
      else
        echo "install: building the library (no prebuilt one for sources $want and torch $torch_version)"
        MLKD_FAST_FORCE_NATIVE=1 MLKD_FAST_CUDA_ARCHS=${MLKD_FAST_CUDA_ARCHS:-9.0} MAX_JOBS=$(nproc) \
          $PY -m pip install --no-build-isolation --no-deps --no-index -e . || exit 1
      fi
      if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
        $PY -m pip install -q --no-deps --no-index benchmarks/wheels/*.whl || echo "install: the carried wheels failed"
        $PY -c 'from liger_kernel.transformers.kl_div import LigerKLDIVLoss; print("install: Liger-Kernel importable")' \
          || echo "install: Liger-Kernel does not import; its benchmark rows will skip"
      fi
      # The library must load, and with a GPU hold its CUDA kernels: a silent fallback would time the wrong code.
      GPU=$GPU $PY - <<'EOF'
import os, mlkd_fast
from mlkd_fast import _native
print("mlkd_fast from", os.path.dirname(mlkd_fast.__file__))
for device in ("cpu", "cuda"):
    print(device, {name: (bool(s), s.reason) for name, s in mlkd_fast.available_backends(device).items()})
assert _native.LOADED, _native.LOAD_ERROR
assert os.environ["GPU"] != "1" or _native.has_cuda_kernels(), "the library has no CUDA kernels"
EOF
      ;;
    tests|compile-tests)
      if [ "$NAME" = tests ]; then select="cuda and not compile_fullgraph"; else select="cuda and compile_fullgraph"; fi
      $PY -m pytest tests -k "$select" --ignore=tests/test_cuda_emulated.py --ignore=tests/test_triton_build.py \
        --ignore=tests/test_linear_kd_triton.py \
        -p no:cacheprovider -n "$WORKERS" --timeout 120 -q -rfE --junitxml "$OUT/part${PART}_tests.xml" ;;
    lm-triton)
      # linear_kd's Triton row kernel compiled (not interpreted) against the torch row function: the small
      # cases of the interpreter's tests, then a 128256 vocabulary at the real tile with its memory check
      # (nothing of rows x V allocated); out of the tests stage so that its compiles have their own limit
      $PY -m pytest tests/test_linear_kd_triton.py -k cuda -p no:cacheprovider -q -rfE ;;
    bench)
      # part 2 adds the zoo's losses beside their eager twins
      if [ "$PART" = 1 ]; then set_=headline files=(benchmarks/test_bench_losses.py)
      else set_=rest files=(benchmarks/test_bench_losses.py benchmarks/test_bench_methods.py); fi
      MLKD_BENCH_SET=$set_ MLKD_BENCH_TINY=$TINY $PY -m pytest "${files[@]}" -k "$DEV" -q \
        -p no:cacheprovider --benchmark-json "$OUT/part${PART}_bench.json" ;;
    train)
      if [ "$GPU" = 1 ]; then size=(); else size=(--tiny); fi
      $PY benchmarks/train_throughput.py "${size[@]}" --out "$OUT/train_throughput.json" ;;
    cache)
      # cached vs live distillation images/s (benchmarks/teacher_cache.py); its JSON goes into the log (OUT holds
      # at most 5 files a part)
      if [ "$GPU" = 1 ]; then size=(--data cifar100 --per-class 50 --epochs 3 --batch-size 256 --time-limit 45)
      else size=(--tiny); fi
      json=$(mktemp /tmp/teacher_cache.XXXXXX.json)
      $PY benchmarks/teacher_cache.py "${size[@]}" --no-digits --out "$json"; rc=$?
      cat "$json"; rm -f "$json"; exit $rc ;;
    lm)
      # SPEC §9's GPU figures; the JSON goes into the log with its table (OUT holds at most 5 files a part)
      if [ "$GPU" = 1 ]; then sel="cuda or roofline"; else sel="float32-live-jsd-N64 and (fused or gemms)"; fi
      json=$(mktemp /tmp/bench_lm.XXXXXX.json)
      MLKD_BENCH_TINY=$TINY $PY -m pytest benchmarks/test_bench_lm.py -k "$sel" -q -p no:cacheprovider \
        --benchmark-json "$json"; rc=$?
      $PY -m benchmarks.report_lm "$json" --out "$(dirname "$json")/bench_lm_report" --readme ''
      cat "$json"; echo; rm -f "$json"; exit $rc ;;
    sanitize)
      if [ "$GPU" != 1 ]; then echo "sanitize: skipped, no GPU"; exit 0; fi
      if ! command -v compute-sanitizer > /dev/null; then echo "sanitize: skipped, compute-sanitizer is missing"; exit 0; fi
      # gVisor (kernel 4.4.0 as it reports itself) refuses the sanitizer the device; Firecracker allows it.
      case $(uname -r) in 4.4.0*) echo "sanitize: skipped, gVisor runtime ($(uname -r)) refuses the device"; exit 0 ;; esac
      compute-sanitizer --tool memcheck --error-exitcode 9 $PY tools/sanitize_ops.py || exit $?
      compute-sanitizer --tool racecheck --error-exitcode 9 $PY tools/sanitize_ops.py ;;
    *) echo "unknown stage $NAME" >&2; exit 2 ;;
  esac
  exit $?
fi

PART=${1:-} OUT=${2:-}
if [ "$PART" != 1 ] && [ "$PART" != 2 ] || [ -z "$OUT" ]; then
  echo "usage: benchmarks/gpu_pass.sh 1|2 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/part$PART.log SUMMARY=$OUT/part${PART}_summary.txt
BUDGET=${MLKD_GPU_PASS_BUDGET_S:-470}
GPU=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2> /dev/null || echo 0)
echo "gpu_pass part $PART: gpu=$GPU, budget ${BUDGET} s, $(date -u +%FT%TZ)" | tee "$SUMMARY"
: > "$LOG"
START=$SECONDS
FAILED=0

run() {  # run STAGE LIMIT_S: the stage under min(LIMIT_S, what is left of the budget)
  local stage=$1 limit=$2 left=$((BUDGET - (SECONDS - START) - 5))
  if [ "$left" -lt 15 ]; then
    echo "$stage: not run, the part's budget is spent" | tee -a "$SUMMARY"
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "===== $stage (limit $limit s) =====" >> "$LOG"
  timeout -s INT -k 20 "$limit" bash "$SELF" stage "$stage" "$OUT" "$PART" "$GPU" >> "$LOG" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (stopped at its limit)"
  echo "$stage: exit $rc in $((SECONDS - t0)) s$note" | tee -a "$SUMMARY"
  [ "$rc" = 0 ] || FAILED=1
}

run env 30
run install 240
if [ "$PART" = 1 ]; then
  run tests 210
  run lm-triton 90
  run bench 240
else
  run train 150
  run cache 60
  run sanitize 150
  run compile-tests 90
  run lm 120
  run bench 200
fi
if [ -f "$OUT/part${PART}_bench.json" ]; then
  $PY -m benchmarks.report "$OUT/part${PART}_bench.json" 2>> "$LOG" | tee -a "$LOG"
fi
grep -E "(passed|failed|error|skipped)( |,|$)" "$LOG" | grep -E "^=*[ 0-9]" | tail -5 | tee -a "$SUMMARY"
echo "part $PART: $((SECONDS - START)) s in all, files: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$SUMMARY"
exit $FAILED
