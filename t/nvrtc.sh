#!/bin/sh
# Fetches NVRTC (CUDA 13.0's runtime compiler) from its PyPI wheel, so that the kernels
# compile where no CUDA toolkit is installed (CI, a laptop): `make check` puts the
# directory this prints on LD_LIBRARY_PATH. Pinned to the 13.0 line: PTX from an NVRTC newer
# than the driver's CUDA version does not load, and the GPU machine's driver is CUDA 13.0.
# Cached outside the checkout ($NGX_GPU_CACHE, default ~/.cache/ngx-gpu), so a fresh clone
# does not download it again. Prints the library directory.
set -eu

version=13.0.88
cache=${NGX_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ngx-gpu}
dir=$cache/nvrtc-$version
lib=$dir/nvidia/cu13/lib

if [ ! -f "$lib/libnvrtc.so.13" ] || [ ! -f "$lib/libnvrtc-builtins.so.13.0" ]; then
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/nvrtc.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_12_x86_64 --python-version 3.11 --implementation py \
        -d "$tmp" "nvidia-cuda-nvrtc==$version" >&2
    python3 -m zipfile -e "$tmp"/nvidia_cuda_nvrtc-"$version"-*.whl "$tmp/x" >&2
    rm -rf "$dir"
    mv "$tmp/x" "$dir"
fi
echo "$lib"
