#!/bin/sh
# The official OpenAI Python client, unmodified, against `gpu_process embeddings`
# (t/embeddings.rs runs t/openai/client.py): a venv with openai and numpy from PyPI
# (t/pyvenv.sh), then that test with it. Skips, saying so, only when PyPI cannot be
# reached. `make check` calls it.
set -eu
cd "$(dirname "$0")/../.."
rc=0
py=$(sh t/pyvenv.sh openai "openai, numpy" "openai>=1.40" numpy) || rc=$?
[ "$rc" = 3 ] && exit 0
[ "$rc" = 0 ] || exit "$rc"
NGX_GPU_OPENAI_PYTHON=$py ${CARGO:-cargo} test --release --test embeddings openai_client -- --nocapture
