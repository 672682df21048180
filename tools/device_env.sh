#!/usr/bin/env bash
# Creates (or reuses) .venv-device: the GPU machine's Python and package versions
# (tools/device-requirements.txt), for building the library it will load and rehearsing its pass.
#   tools/device_env.sh            prints the environment's python path on its last line
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLKD_DEVICE_VENV:-.venv-device}
REQ=tools/device-requirements.txt
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQ" "$VENV/requirements.txt"; then
  PY=
  for candidate in python3.12 "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; do
    if "$candidate" -c '' 2> /dev/null; then PY=$candidate; break; fi
  done
  if [ -z "$PY" ]; then
    echo "device_env: no Python 3.12 here; rehearsing with $(python3 --version)" >&2
    PY=python3
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -r "$REQ"
  cp "$REQ" "$VENV/requirements.txt"
fi
echo "$PWD/$VENV/bin/python"
