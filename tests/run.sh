#!/usr/bin/env bash
# The test command: installs what is missing, builds everything with the tests, runs them.
# Tests labelled gpu report as skipped on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cmake/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON >/dev/null
cmake --build build -j"$(nproc)"
cd build
ctest --output-on-failure -j"$(nproc)" "$@"
