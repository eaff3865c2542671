#!/usr/bin/env bash
# Builds and runs conv_probe.cpp against oneDNN from the package registry: the library from
# onednn-cpu-gomp 2023.2.0 (oneDNN 3.2, CPU only, GNU OpenMP; it ships no headers) and the
# headers of onednn-devel 2026.1.0 (the C++ API used here is the same in 3.2). Nothing is
# installed into .venv: the wheels are unpacked under ${CNNEB_ONEDNN_DIR:-/tmp/cnneb-onednn}.
#   bash bench/onednn/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${CNNEB_ONEDNN_DIR:-/tmp/cnneb-onednn}"
py="$(cd "$here/../.." && pwd)/.venv/bin/python"
mkdir -p "$dir"
if [ ! -e "$dir/lib/libdnnl.so.3" ]; then
  "$py" -m pip download --quiet --no-deps -d "$dir/wheels" onednn-cpu-gomp==2023.2.0 \
      onednn-devel==2026.1.0
  for w in "$dir"/wheels/*.whl; do "$py" -m zipfile -e "$w" "$dir/unpacked"; done
  mkdir -p "$dir/lib" && cp "$dir"/unpacked/onednn_cpu_gomp-*.data/data/lib/libdnnl.so.3 "$dir/lib/"
  cp -r "$dir"/unpacked/onednn_devel-*.data/data/include "$dir/include"
fi
g++ -O2 -std=c++17 "$here/conv_probe.cpp" -I"$dir/include" -L"$dir/lib" -l:libdnnl.so.3 \
    -Wl,-rpath,"$dir/lib" -o "$dir/conv_probe"
"$dir/conv_probe"
