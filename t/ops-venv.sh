#!/bin/sh
# A Python venv for the operator checks (t/k8s/validate.sh, t/monitoring/check.py): the
# Kubernetes schema validator from PyPI (kubernetes-validate, which bundles the schemas of
# every Kubernetes version it knows, so validating needs no network) and PyYAML with it.
# Pinned; made once in the cache outside the checkout ($NGX_GPU_CACHE, default
# ~/.cache/ngx-gpu) and remade when the pins change. Needs python3-venv (t/deps.sh --tests).
# Prints the venv's python.
set -eu

pins="kubernetes-validate==1.37.0 PyYAML==6.0.4 jsonschema==4.26.0"
cache=${NGX_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ngx-gpu}
tag=$(echo "$pins" | cksum | cut -d' ' -f1)
venv=$cache/ops-venv-$tag

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    mkdir -p "$cache"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    # shellcheck disable=SC2086 # one word per pin
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pins >&2
    touch "$venv/.complete"
fi
echo "$venv/bin/python"
