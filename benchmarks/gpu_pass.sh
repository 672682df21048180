#!/usr/bin/env bash
# The whole GPU pass in one script: build the CUDA extension (sm_90), run the tests on the GPU, time
# every loss provider at the SPEC 5 shapes, time the ResNet-34 -> ResNet-18 distillation step, run
# compute-sanitizer on the CUDA ops, and write the report. Every result lands under OUT_DIR.
#
#   benchmarks/gpu_pass.sh OUT_DIR [stage ...]     stages: env build tests bench-kl bench-corr train report sanitize
#                                                  (default: all, in that order; each has its own time limit)
# Works against an installed torch/triton without network (pip --no-deps --no-build-isolation).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_pass.sh OUT_DIR [stage ...]}
shift
STAGES=${*:-env build tests bench-kl bench-corr train report sanitize}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
run() {  # run STAGE LIMIT_S CMD...: log to OUT/STAGE.txt, never abort the pass
  local stage=$1 limit=$2; shift 2
  local t0=$SECONDS
  # SIGINT first: pytest then ends its session as for Ctrl-C and pytest-benchmark still writes the
  # JSON of the benchmarks that finished (a plain TERM would lose the whole stage's results).
  timeout -s INT -k 30 "$limit" "$@" > "$OUT/$stage.txt" 2>&1
  echo "$stage: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
}
for stage in $STAGES; do
  case $stage in
    env) run env 60 bash -c "nvidia-smi; git rev-parse HEAD; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda)'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version" ;;
    build) MLKD_FAST_CUDA_ARCHS=${MLKD_FAST_CUDA_ARCHS:-9.0} run build 420 $PY -m pip install --no-build-isolation --no-deps -v -e .
           # Wheels of other libraries to compare with (e.g. Liger-Kernel), fetched beforehand on a machine
           # with network and carried here (benchmarks/wheels/ is git-ignored): the GPU machine has none.
           if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
             run wheels 120 $PY -m pip install --no-deps --no-index benchmarks/wheels/*.whl
           fi
           run backends 60 $PY -c "import mlkd_fast; [print(d, mlkd_fast.available_backends(d)) for d in ('cpu', 'cuda')]" ;;
    tests) run tests 300 $PY -m pytest -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" \
             tests/test_kd_kl_kernels.py tests/test_correlation_kernels.py tests/test_triton_ops.py \
             tests/test_native_ops.py tests/test_mlkd_loss.py tests/test_validation.py tests/test_reference.py ;;
    bench-kl) run bench-kl 420 $PY -m pytest benchmarks/test_bench_losses.py -q -p no:cacheprovider \
                -k "cuda and (kd_kl or roofline)" --benchmark-json "$OUT/gpu_kl.json" ;;
    bench-corr) run bench-corr 480 $PY -m pytest benchmarks/test_bench_losses.py -q -p no:cacheprovider \
                  -k "cuda and (correlation or roofline)" --benchmark-json "$OUT/gpu_corr.json" ;;
    train) run train 300 $PY benchmarks/train_throughput.py --out "$OUT/train_throughput.json" ;;
    report) run report 120 bash -c "$PY -m benchmarks.report $OUT/gpu_*.json --out $OUT/report.md --plots $OUT/plots" ;;
    sanitize) if ls csrc/*.cu > /dev/null 2>&1; then
                run sanitize 240 bash -c "compute-sanitizer --tool memcheck $PY benchmarks/sanitize_ops.py && compute-sanitizer --tool racecheck $PY benchmarks/sanitize_ops.py"
              else echo "sanitize: no CUDA sources, skipped" | tee -a "$OUT/stages.txt"; fi ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
