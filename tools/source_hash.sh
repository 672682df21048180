#!/usr/bin/env bash
# Prints the SHA-256 of everything the compiled library is built from (csrc/ and setup.py), so that a
# library prebuilt elsewhere is used only for the sources it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name 'setup.py' \) \
  | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
