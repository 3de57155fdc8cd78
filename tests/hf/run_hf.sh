#!/usr/bin/env bash
# ssmtune against Hugging Face transformers and PEFT themselves, on a machine whose python3 has torch,
# transformers and peft (the GPU machine, REFERENCE.md section 6).
#
#   tests/hf/run_hf.sh [--build DIR] [--work DIR] [--configs "tiny m130 ..."] [PIECE...]
#
# Pieces, run in the order given (default: references cpu cuda exports nf4 table):
#   references  make_reference.py of the configs (default all: tiny tiny_untied tiny_falcon m130) into WORK/refs
#   cpu         test_hf_reference over WORK/refs (CPU fp64 and fp32, the NF4 error, the loader variants)
#   cuda        test_hf_reference_cuda over WORK/refs (skipped without a GPU)
#   exports     per config: ssmtune quantize, hf_dump, ssmtune export --format peft and --format merged
#               (f32), then check_exports.py: HF + PEFT load the exports and compute ssmtune's logits
#   nf4         per config: the merged export of zero adapters, then nf4_reader.py on the quantized model
#   table       every error line of the pieces' logs, one line per comparison
#   fixtures    regenerates the committed tests/hf/fixtures (the tiny configs, CPU fp32), alone
# DIR is the CMake build directory (default build-gpu, as tests/gpu.sh), WORK where references, outputs
# and logs go (default DIR/hf_work; mamba-130m takes about 3 GB). When OUT is set (the GPU machine's
# folder that comes back), the logs are copied to $OUT/hf_logs and the fixtures to $OUT/hf_fixtures.
# PYTHON names the interpreter (default python3). Exits 77 (ctest: skipped) when it lacks torch,
# transformers or peft; otherwise non-zero when any piece failed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="$root/build-gpu"
work=""
pieces=()
configs=(tiny tiny_untied tiny_falcon m130)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build="$(cd "$2" && pwd)"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --configs) read -r -a configs <<<"$2"; shift 2 ;;
    *) pieces+=("$1"); shift ;;
  esac
done
[[ ${#pieces[@]} -eq 0 ]] && pieces=(references cpu cuda exports nf4 table)
work="${work:-$build/hf_work}"
python="${PYTHON:-python3}"
# PEFT writes target_modules from a set of strings: a fixed hash seed keeps regenerated fixtures
# byte for byte the same.
export PYTHONHASHSEED=0
fixture_configs=(tiny tiny_untied tiny_falcon)

if ! "$python" -c "import torch, transformers, peft, safetensors" >/dev/null 2>&1; then
  echo "$python lacks torch, transformers, peft or safetensors: skipped"
  exit 77
fi
mkdir -p "$work/logs"
refs="$work/refs"
out="$work/out"
ssmtune="$build/recipes/ssmtune"

need() {  # need FILE WHAT: a piece that runs before this one must have made FILE
  if [[ ! -e "$1" ]]; then
    echo "missing $1 ($2): run the pieces in order"
    return 1
  fi
}

piece_references() {
  "$python" "$here/make_reference.py" "$refs" --configs "${configs[@]}"
}

piece_cpu() {
  need "$build/tests/hf/test_hf_reference" "the build" || return 1
  SSMTUNE_HF_DIR="$refs" "$build/tests/hf/test_hf_reference"
}

piece_cuda() {
  if [[ ! -x "$build/tests/hf/test_hf_reference_cuda" ]]; then
    echo "$build was built without CUDA: skipped"
    return 77
  fi
  SSMTUNE_HF_DIR="$refs" "$build/tests/hf/test_hf_reference_cuda"
}

piece_exports() {
  local c status=0
  for c in "${configs[@]}"; do
    need "$refs/$c/reference.safetensors" "the references piece" || return 1
    local o="$out/$c"
    rm -rf "$o" && mkdir -p "$o"
    { "$ssmtune" quantize --model "$refs/$c/model" --out "$o/quantized" &&
      "$build/tests/hf/hf_dump" "$refs/$c" "$o/quantized" "$o" &&
      "$ssmtune" export --checkpoint "$o/peft/checkpoints/step_0" --format peft --out "$o/peft_export" &&
      "$ssmtune" export --checkpoint "$o/all/checkpoints/step_0" --format merged --dtype f32 --out "$o/merged" &&
      "$python" "$here/check_exports.py" --name "$c" "$refs/$c/model_nf4" "$o/peft_export" "$o/merged" \
        "$o/ssmtune_logits.safetensors"; } || status=1
  done
  return $status
}

piece_nf4() {
  local c status=0
  for c in "${configs[@]}"; do
    local o="$out/$c"
    need "$o/zero/checkpoints/step_0" "the exports piece" || return 1
    rm -rf "$o/merged_zero"
    { "$ssmtune" export --checkpoint "$o/zero/checkpoints/step_0" --format merged --dtype f32 --out "$o/merged_zero" &&
      "$python" "$here/nf4_reader.py" --name "$c" "$o/quantized" "$refs/$c/model" "$o/merged_zero"; } || status=1
  done
  return $status
}

piece_table() {
  echo "== HF comparisons: max|ours - HF| / max|HF| (test_hf_reference*.cpp, check_exports.py, nf4_reader.py) =="
  cat "$work"/logs/{cpu,cuda,exports,nf4}.log 2>/dev/null | grep -E "^(hf-compare|check-exports|nf4-reader) " |
    sed -E 's/^(hf-compare|check-exports|nf4-reader) //'
}

piece_fixtures() {
  local fixtures="$here/fixtures"
  rm -rf "$work/fixtures"
  "$python" "$here/make_reference.py" "$work/fixtures" --fixtures --configs "${fixture_configs[@]}" || return 1
  find "$work/fixtures" -name README.md -delete  # PEFT's model card
  rm -rf "$fixtures" && cp -r "$work/fixtures" "$fixtures"
  if [[ -n "${OUT:-}" ]]; then rm -rf "$OUT/hf_fixtures" && cp -r "$fixtures" "$OUT/hf_fixtures"; fi
  du -sh --apparent-size "$fixtures"
}

status=0
skipped=0
for piece in "${pieces[@]}"; do
  case "$piece" in
    references|cpu|cuda|exports|nf4|fixtures)
      log="$work/logs/$piece.log"
      "piece_$piece" >"$log" 2>&1
      code=$?
      if [[ $code -eq 0 ]]; then
        echo "$piece: ok (log: $log)"
      elif [[ $code -eq 77 && "$piece" == cuda ]]; then
        echo "$piece: skipped ($(tail -1 "$log"))"
        skipped=$((skipped + 1))
      else
        echo "$piece: FAILED, exit $code (log: $log); its last lines:"
        tail -25 "$log"
        status=1
      fi ;;
    table) piece_table ;;
    *) echo "unknown piece '$piece'"; exit 2 ;;
  esac
done
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT/hf_logs" && cp "$work"/logs/*.log "$OUT/hf_logs/"; fi
# A lone piece that skipped is a skipped ctest entry.
[[ $status -eq 0 && $skipped -eq 1 && ${#pieces[@]} -eq 1 ]] && exit 77
exit $status
