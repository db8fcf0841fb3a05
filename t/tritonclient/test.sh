#!/bin/sh
# Triton's own HTTP client against nginx (t/kserve.rs runs t/tritonclient/client.py): a
# venv with tritonclient[http] from PyPI (t/pyvenv.sh), then that test with it. Skips,
# saying so, only when PyPI cannot be reached. `make check` calls it.
set -eu
cd "$(dirname "$0")/../.."
rc=0
py=$(sh t/pyvenv.sh tritonclient "tritonclient.http, numpy" "tritonclient[http]>=2.40" numpy) || rc=$?
[ "$rc" = 3 ] && exit 0
[ "$rc" = 0 ] || exit "$rc"
NGX_GPU_TRITON_PYTHON=$py ${CARGO:-cargo} test --release --test kserve tritonclient -- --nocapture
