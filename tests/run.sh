#!/usr/bin/env bash
# The test command: installs what is missing, builds everything with the tests, runs them.
# Tests labelled gpu report as skipped on a machine without a GPU. With SSMTUNE_HARDENING=1, then
# tests/hardening.sh: the CPU tests again under AddressSanitizer and UndefinedBehaviorSanitizer, and the
# fuzz targets for a bounded time (not yet part of CI: its whole run has not been timed on 2 cores).
# Arguments go to the first ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cmake/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON >/dev/null
cmake --build build -j"$(nproc)"
cd build
ctest --output-on-failure -j"$(nproc)" "$@"
cd ..
[ "${SSMTUNE_HARDENING:-0}" = 1 ] && bash tests/hardening.sh
true
