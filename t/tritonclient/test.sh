#!/bin/sh
# Triton's own HTTP client against nginx (t/kserve.rs runs t/tritonclient/client.py): makes
# a venv with tritonclient[http] from PyPI (cached under $NGX_GPU_CACHE), then runs that
# test with it. Skips, saying so, only when PyPI cannot be reached. `make check` calls it.
set -eu
cd "$(dirname "$0")/../.."
cache=${NGX_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ngx-gpu}
venv=$cache/tritonclient-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import tritonclient.http, numpy" 2>/dev/null; then
    mkdir -p "$cache"
    rm -rf "$venv"
    python3 -m venv "$venv"
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "tritonclient[http]>=2.40" numpy; then
        if ! python3 -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/', timeout=10)" 2>/dev/null; then
            echo "SKIPPED: tritonclient test: PyPI is unreachable" >&2
            rm -rf "$venv"
            exit 0
        fi
        echo "t/tritonclient/test.sh: installing tritonclient[http] failed" >&2
        exit 1
    fi
fi
NGX_GPU_TRITON_PYTHON=$venv/bin/python ${CARGO:-cargo} test --release --test kserve tritonclient -- --nocapture
