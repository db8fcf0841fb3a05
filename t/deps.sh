#!/bin/sh
# The install step of the README's commands (`make run`, `make test` call it first): installs
# the Debian 12 packages the build needs, and with `--tests`, also those the tests use.
# Works as root and, through sudo, as any other user; installs nothing when all are present.
# POSIX sh, so that it runs on a bare system before make itself is installed.
#
#   sh t/deps.sh            what `make run` needs (make, a C toolchain, nginx's libraries,
#                           libclang for bindgen)
#   sh t/deps.sh --tests    that, plus what `make check` and `make test` use
#   sh t/deps.sh --gpu-bundle  that, plus wrk (carried to the GPU machine by make gpu-bundle)
set -eu

build="make build-essential pkg-config libclang-dev libpcre2-dev libssl-dev zlib1g-dev"
# curl: the integration tests' h2c client checks; python3 and pip: the GPU bundle's artifact
# lister, and t/nvrtc.sh (NVRTC from its PyPI wheel, for compiling kernels without CUDA);
# chromium: t/metrics.rs renders the gpu_status page headless.
# python3-venv: t/pyvenv.sh for t/tritonclient/test.sh (Triton's client from PyPI), t/openai/test.sh (the
# official OpenAI client) and t/ops-venv.sh (the
# Kubernetes and monitoring checks' packages), each in a venv of its own, and
# t/embed/golden.py's sentence-transformers, when the golden vectors are made again;
# procps: pgrep, for t/entrypoint/test.sh.
tests="curl procps python3 python3-pip python3-venv chromium"

want=$build
case "${1:-}" in
    --tests) want="$want $tests" ;;
    --gpu-bundle) want="$want $tests wrk" ;;
    "") ;;
    *) echo "usage: sh t/deps.sh [--tests | --gpu-bundle]" >&2; exit 2 ;;
esac

need=""
for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || need="$need $p"
done

if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null 2>&1; then
        as_root="sudo"
    else
        echo "t/deps.sh: missing packages:$need; run as root or install sudo" >&2
        exit 1
    fi
    echo "installing:$need"
    # env: an assignment after an empty $as_root would be taken for the command name.
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "t/deps.sh: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
}
