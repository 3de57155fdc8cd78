#!/usr/bin/env bash
# Installs the Debian packages ssmtune builds against, when missing. The CUDA toolkit (optional) is
# expected under /usr/local/cuda.
set -euo pipefail
packages=(cmake g++ make libopenmpi-dev openmpi-bin libhdf5-dev catch2 libyaml-cpp-dev nlohmann-json3-dev
          libcli11-dev libfmt-dev zlib1g-dev libpcre2-dev libutf8proc-dev
          clang libclang-rt-dev libomp-dev)  # the last three: the sanitizer and fuzz build (tests/hardening.sh)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
