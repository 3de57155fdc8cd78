#!/usr/bin/env bash
# The demo: installs what is missing, builds, writes a tiny random Mamba and the synthetic data set,
# fine-tunes it with QLoRA (GPU if present, else CPU), and exports the PEFT adapter. Extra arguments
# are recipe overrides, e.g. `bash recipes/demo.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cmake/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
cmake --build build -j"$(nproc)" --target ssmtune
ssmtune=./build/recipes/ssmtune
rm -rf runs/demo
$ssmtune init --size demo --out runs/demo/model --seed 0
$ssmtune demo-data --out runs/demo/data.h5 --seed 0
$ssmtune train --config recipes/configs/demo.yaml "$@"
latest=$(ls -d runs/demo/train/checkpoints/step_* | sort -t_ -k2 -n | tail -n 1)
$ssmtune export --checkpoint "$latest" --format peft --out runs/demo/peft_adapter
