#!/usr/bin/env bash
# Rehearses on a machine without a GPU what the GPU machine will run, in its versions, so that a
# version break fails here and not on GPU time:
#   1. the GPU machine's environment (tools/device_env.sh) and the library prebuilt for it
#      (tools/prebuild_native.sh);
#   2. both parts of benchmarks/gpu_pass.sh, dry (CUDA cases skip), in a copy of the working tree as
#      the GPU machine gets it, installing exactly as there (the prebuilt library must be taken);
#   3. in those versions: the per-op tests on every backend (the Triton interpreter's and the native
#      library's included), the backend-specific, dispatch/autograd and loss-module tests, and the
#      sm_90 build check.
# CI runs it after the main suite. Exit status: non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$(tools/device_env.sh | tail -1)
tools/prebuild_native.sh
COPY=$ROOT/.rehearsal
rm -rf "$COPY" && mkdir -p "$COPY"
# What the device tool sends: tracked and untracked-not-ignored files, plus the carried prebuilt/.
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
  | tar -cf - --null -T - | tar -xf - -C "$COPY"
cp -r prebuilt "$COPY/prebuilt"
if [ -d benchmarks/wheels ]; then cp -r benchmarks/wheels "$COPY/benchmarks/wheels"; fi
cd "$COPY"
export PATH="$(dirname "$PY"):$PATH" PYTHON=python3  # python3 is the device environment's, as there
for part in 1 2; do
  t0=$SECONDS
  bash benchmarks/gpu_pass.sh "$part" "$COPY/out$part"
  files=$(find "$COPY/out$part" -type f | wc -l)
  echo "rehearse: gpu_pass part $part passed dry in $((SECONDS - t0)) s, $files files"
  [ "$files" -le 8 ] || { echo "rehearse: part $part wrote $files files, more than the 8 that come back" >&2; exit 1; }
  if [ -n "$(find "$COPY/out$part" -mindepth 3 -type f)" ]; then
    echo "rehearse: part $part wrote files more than 2 folders down" >&2; exit 1
  fi
done
grep -q "the carried prebuilt library" "$COPY/out1/part1.log" \
  || { echo "rehearse: the pass built the library instead of taking the prebuilt one" >&2; exit 1; }
python3 -m pytest -p no:cacheprovider -q -n 2 --dist loadfile \
  tests/test_op_kd_kl.py tests/test_op_correlation.py tests/test_backend_triton.py tests/test_backend_native.py \
  tests/test_op_contract.py tests/test_import_graph.py tests/test_backend_resolution.py tests/test_op_fakes.py \
  tests/test_autograd_glue.py tests/test_mlkd_loss.py tests/test_triton_build.py
