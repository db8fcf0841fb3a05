#!/bin/sh
# The official OpenAI Python client, unmodified, against `gpu_process embeddings`
# (t/embeddings.rs runs t/openai/client.py): makes a venv with openai and numpy from PyPI
# (cached under $NGX_GPU_CACHE), then runs that test with it. Skips, saying so, only when
# PyPI cannot be reached. `make check` calls it.
set -eu
cd "$(dirname "$0")/../.."
cache=${NGX_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ngx-gpu}
venv=$cache/openai-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, numpy" 2>/dev/null; then
    mkdir -p "$cache"
    rm -rf "$venv"
    python3 -m venv "$venv"
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "openai>=1.40" numpy; then
        if ! python3 -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/', timeout=10)" 2>/dev/null; then
            echo "SKIPPED: openai client test: PyPI is unreachable" >&2
            rm -rf "$venv"
            exit 0
        fi
        echo "t/openai/test.sh: installing openai failed" >&2
        exit 1
    fi
fi
NGX_GPU_OPENAI_PYTHON=$venv/bin/python ${CARGO:-cargo} test --release --test embeddings openai_client -- --nocapture
