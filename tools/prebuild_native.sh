#!/usr/bin/env bash
# Builds the compiled library for the GPU machine here, on a machine without a GPU, so that the GPU
# pass spends none of its minutes compiling: against the GPU machine's torch (.venv-device, see
# tools/device_env.sh), for sm_90 (MLKD_FAST_CUDA_ARCHS overrides), into the git-ignored prebuilt/:
#   prebuilt/_C.so          the library (no Python ABI: any Python that runs that torch loads it)
#   prebuilt/SOURCE_HASH    tools/source_hash.sh of the sources it was built from
#   prebuilt/TORCH_VERSION  the torch it was built against
# The GPU pass loads it only when both still match; carry it with `carry: ["prebuilt"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(tools/device_env.sh | tail -1)
HASH=$(tools/source_hash.sh)
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
if [ -f prebuilt/_C.so ] && [ "$(cat prebuilt/SOURCE_HASH 2>/dev/null)" = "$HASH" ] \
   && [ "$(cat prebuilt/TORCH_VERSION 2>/dev/null)" = "$TORCH_VERSION" ]; then
  echo "prebuilt/_C.so is current (sources $HASH, torch $TORCH_VERSION)"
  exit 0
fi
rm -rf prebuilt && mkdir -p prebuilt
t0=$SECONDS
MLKD_FAST_FORCE_NATIVE=1 MLKD_FAST_CUDA_ARCHS=${MLKD_FAST_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" setup.py -q build_ext --build-lib prebuilt/lib --build-temp prebuilt/obj
mv prebuilt/lib/mlkd_fast/_C.so prebuilt/_C.so
rm -rf prebuilt/lib prebuilt/obj
echo "$HASH" > prebuilt/SOURCE_HASH
echo "$TORCH_VERSION" > prebuilt/TORCH_VERSION
echo "prebuilt/_C.so: $(du -h prebuilt/_C.so | cut -f1), torch $TORCH_VERSION, sm ${MLKD_FAST_CUDA_ARCHS:-9.0}, $((SECONDS - t0)) s"
