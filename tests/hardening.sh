#!/usr/bin/env bash
# Hostile input, the second half of the test command (tests/run.sh; README, "Hostile input"):
# the CPU test suite built with AddressSanitizer and UndefinedBehaviorSanitizer, then every fuzz target
# replaying its committed corpus and fuzzing from it for a bounded number of runs (ctest label fuzz).
# One clang build (SSMTUNE_FUZZ=ON, cmake/sanitizers.cmake) serves both. Arguments go to ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build-hardening
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON -DSSMTUNE_DISABLE_CUDA=ON \
      -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DSSMTUNE_FUZZ=ON >/dev/null
cmake --build "$build" -j"$(nproc)"
# Leak checking is off for the test suite: OpenMPI's plugins, unloaded in MPI_Finalize, leave
# allocations LeakSanitizer can neither attribute nor suppress by library, and every process that
# initializes MPI (the mpirun tests, the jobs test_job_failures starts) would fail on them. The
# fuzz targets, which cover the readers of users' files, check leaks (tests/fuzz/CMakeLists.txt).
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd "$build"
ctest --output-on-failure -j"$(nproc)" -L "cpu|fuzz" "$@"
