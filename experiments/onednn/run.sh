#!/usr/bin/env bash
# Builds and runs conv_probe.cpp: oneDNN's forward convs alone, outside XLA, against the
# same oneDNN 3.2 (library and headers from the package registry) that cnneb_jax/onednn.py
# builds its FFI kernels with; it unpacks them first where they are missing.
#   bash experiments/onednn/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$(cd "$here/../.." && pwd)/.venv/bin/python"
dir="$("$py" -c 'from cnneb_jax import onednn; onednn.build(); print(onednn.cache_dir())')"
g++ -O2 -std=c++17 "$here/conv_probe.cpp" -I"$dir/include" -L"$dir/lib" -l:libdnnl.so.3 \
    -Wl,-rpath,"$dir/lib" -o "$dir/conv_probe"
"$dir/conv_probe"
