#!/bin/sh
# t/pyvenv.sh NAME IMPORTS PACKAGE...: a venv with PACKAGEs from PyPI for a client test
# (t/openai/test.sh, t/tritonclient/test.sh), cached as $NGX_GPU_CACHE/NAME-venv (default
# ~/.cache/ngx-gpu) and made again when `import IMPORTS` fails in it. Prints its python.
# Exits 3, saying SKIPPED on stderr, only when PyPI cannot be reached; 1 when installing
# fails otherwise. Needs python3-venv (t/deps.sh --tests).
set -eu
name=$1
imports=$2
shift 2
cache=${NGX_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ngx-gpu}
venv=$cache/$name-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import $imports" 2>/dev/null; then
    mkdir -p "$cache"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2; then
        rm -rf "$venv"
        if ! python3 -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/', timeout=10)" 2>/dev/null; then
            echo "SKIPPED: $name: PyPI is unreachable" >&2
            exit 3
        fi
        echo "t/pyvenv.sh: installing $* failed" >&2
        exit 1
    fi
fi
echo "$venv/bin/python"
