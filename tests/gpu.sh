#!/usr/bin/env bash
# On a GPU machine: builds in build-gpu, then runs the stages named on the command line, in order:
#   test   ctest -L gpu (every CUDA op against the CPU reference, GPU training against CPU training)
#   cpu    the CPU tests as well
#   demo   the demo recipe with device=cuda
#   130m   the mamba-130m recipe on a randomly initialised model and the demo data, 30 steps
#   bench  build-gpu/recipes/ssmtune-bench (arguments after `--` go to it)
#   multi  (two GPUs or more) ctest -L multi_gpu, then ssmtune-bench-dist on 2 ranks through mpirun
# Full logs go under $OUT (or gpu-logs/); a summary of each stage is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0
out=${OUT:-gpu-logs}
mkdir -p "$out"
stages=()
while [[ $# -gt 0 && "$1" != "--" ]]; do stages+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
summary=()
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON >"$out/configure.log" 2>&1 &&
  cmake --build build-gpu -j"$(nproc)" >"$out/build.log" 2>&1
if [[ $? -ne 0 ]]; then
  grep -E "error|Error" "$out/build.log" | head -40
  echo "build failed (log: $out/build.log)"
  exit 1
fi
for stage in "${stages[@]}"; do
  case "$stage" in
    test) (cd build-gpu && ctest -L gpu --output-on-failure) >"$out/ctest_gpu.log" 2>&1
          summary+=("gpu tests: $(grep -E 'tests passed|tests failed' "$out/ctest_gpu.log")")
          grep -E "Failed|FAILED|failed" "$out/ctest_gpu.log" | head -20 ;;
    cpu) (cd build-gpu && ctest -L cpu -j8 --output-on-failure) >"$out/ctest_cpu.log" 2>&1
         summary+=("cpu tests: $(grep -E 'tests passed|tests failed' "$out/ctest_cpu.log")") ;;
    demo) rm -rf runs/demo
          { build-gpu/recipes/ssmtune init --size demo --out runs/demo/model --seed 0 &&
            build-gpu/recipes/ssmtune demo-data --out runs/demo/data.h5 --seed 0 &&
            build-gpu/recipes/ssmtune train --config recipes/configs/demo.yaml device=cuda; } >"$out/demo.log" 2>&1
          summary+=("demo: $(grep -E '^step' "$out/demo.log" | tail -1)") ;;
    130m) rm -rf runs/m130
          { build-gpu/recipes/ssmtune init --size mamba-130m --out runs/m130/model --seed 0 &&
            build-gpu/recipes/ssmtune demo-data --out runs/m130/data.h5 --seed 0 &&
            build-gpu/recipes/ssmtune train --config recipes/configs/mamba-130m.yaml device=cuda \
              model.path=runs/m130/model data.path=runs/m130/data.h5 train.output_dir=runs/m130/train \
              train.max_steps=30 train.grad_accum=1 train.log_every=5 train.save_every=30; } >"$out/m130.log" 2>&1
          summary+=("mamba-130m: $(grep -E '^step' "$out/m130.log" | head -1) ... $(grep -E '^step' "$out/m130.log" | tail -1)")
          tail -3 "$out/m130.log" ;;
    bench) build-gpu/recipes/ssmtune-bench "$@" --json "$out/bench.json" >"$out/bench.log" 2>&1
           summary+=("bench: exit $? (log: $out/bench.log)")
           tail -60 "$out/bench.log" ;;
    multi) (cd build-gpu && ctest -L multi_gpu --output-on-failure) >"$out/ctest_multi.log" 2>&1
           summary+=("multi_gpu tests: $(grep -E 'tests passed|tests failed' "$out/ctest_multi.log")")
           grep -E "Failed|FAILED|failed" "$out/ctest_multi.log" | head -20
           mpirun --allow-run-as-root -np 2 --bind-to none -x NCCL_NVLS_ENABLE=0 \
             build-gpu/recipes/ssmtune-bench-dist --json "$out/dist.json" >"$out/bench_dist.log" 2>&1
           summary+=("bench-dist: exit $? (log: $out/bench_dist.log)")
           tail -30 "$out/bench_dist.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}"
