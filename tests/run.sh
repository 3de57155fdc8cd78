#!/usr/bin/env bash
# The test command: installs what is missing, builds everything with the tests, runs them.
# Tests labelled gpu report as skipped on a machine without a GPU. Then tests/hardening.sh: the CPU tests
# again under AddressSanitizer and UndefinedBehaviorSanitizer, and the fuzz targets for a bounded number of
# runs (SSMTUNE_HARDENING=0 skips it). Arguments go to the first ctest: a selection such as -R scan runs
# only those tests, and then no hardening unless SSMTUNE_HARDENING=1 asks for it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cmake/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON >/dev/null
cmake --build build -j"$(nproc)"
cd build
ctest --output-on-failure -j"$(nproc)" "$@"
cd ..
hardening_default=1
if [ $# -gt 0 ]; then hardening_default=0; fi
if [ "${SSMTUNE_HARDENING:-$hardening_default}" != 0 ]; then bash tests/hardening.sh; fi
