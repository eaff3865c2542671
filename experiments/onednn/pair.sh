#!/usr/bin/env bash
# Builds and runs pair_probe.cpp against the oneDNN 3.2 that cnneb_jax/onednn.py builds its
# FFI kernels with (GNU OpenMP, as the FFI library's), on the two cores.
#   bash experiments/onednn/pair.sh      # -> a markdown table on stdout
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$(cd "$here/../.." && pwd)/.venv/bin/python"
dir="$("$py" -c 'from cnneb_jax import onednn; onednn.build(); print(onednn.cache_dir())')"
g++ -O2 -fopenmp -std=c++20 "$here/pair_probe.cpp" -I"$dir/include" \
    -L"$dir/lib" -l:libdnnl.so.3 -Wl,-rpath,"$dir/lib" -o "$dir/pair_probe"
"$dir/pair_probe"
