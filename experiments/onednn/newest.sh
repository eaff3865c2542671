#!/usr/bin/env bash
# The registry's newest oneDNN (`onednn` 2026.1.0, oneDNN 3.13) for cnneb_jax's FFI kernels,
# in place of 3.2 (`onednn-cpu-gomp` 2023.2.0): its CPU engine runs on SYCL, so it needs the
# SYCL, Unified Runtime, OpenCL CPU, TBB and compiler runtimes beside it (about 1.3 GB). The
# 2026 Unified Runtime wheel has no OpenCL adapter; 2025.3.3's (the same adapter ABI, 0.12)
# fills the gap. Unpacks them into DIR (default /tmp/onednn-newest), builds the kernels there
# and prints the environment that selects them, e.g. for experiments/env_ab.py:
#   bash experiments/onednn/newest.sh
#   .venv/bin/python experiments/env_ab.py --b $(bash experiments/onednn/newest.sh) \
#       --rounds 3 --tasks train:8 forward:8
set -euo pipefail
root="${1:-/tmp/onednn-newest}"
py="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python"
env="CNNEB_ONEDNN_DIR=$root LD_LIBRARY_PATH=$root/lib OCL_ICD_FILENAMES=$root/lib/libintelocl.so"
if [ ! -e "$root/lib/libur_adapter_opencl.so.0" ]; then
    wheels="$root/wheels"
    mkdir -p "$wheels" "$root/lib" "$root/unpacked"
    "$py" -m pip download -q --no-deps -d "$wheels" onednn==2026.1.0 onednn-devel==2026.1.0 \
        intel-sycl-rt==2026.2.0 intel-cmplr-lib-rt==2026.2.0 intel-cmplr-lib-ur==2026.2.0 \
        intel-opencl-rt==2026.2.0 umf==1.2.0 tbb==2023.2.0 >&2
    for w in "$wheels"/*.whl; do unzip -qo "$w" -d "$root/unpacked"; done
    cp -a "$root"/unpacked/*.data/data/lib/* "$root/lib/"
    rm -rf "$root/include" && cp -a "$root"/unpacked/onednn_devel-*.data/data/include "$root/include"
    "$py" -m pip download -q --no-deps -d "$wheels/ur2025" intel-cmplr-lib-ur==2025.3.3 >&2
    unzip -qo "$wheels"/ur2025/*.whl -d "$root/ur2025"
    cp -a "$root"/ur2025/*.data/data/lib/libur_adapter_opencl.so* "$root/lib/"
fi
env $env "$py" -m cnneb_jax.onednn >&2
echo "$env"
