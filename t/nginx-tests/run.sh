#!/usr/bin/env bash
# nginx's own test suite (github.com/nginx/nginx-tests) three times over the nginx that
# `make build` builds: plain, with the module loaded, and with the module active (every
# http test's configuration also gets a server whose location runs gpu_process echo, so
# each worker starts its GPU thread and each configuration load its compile child). Any
# test that passes plain and fails with the module is a regression; the script lists
# them and exits 1.
#
#   bash t/nginx-tests/run.sh PATH-TO-NGINX-TESTS      (or: make nginx-tests NGINX_TESTS=...)
#
#   NGINX_TESTS_JOBS   prove -j (default: the number of CPUs)
#   NGINX_TESTS_ONLY   test files to run instead of all (e.g. "h2*.t proxy*.t")
#
# Not part of `make test`: the suite is not ours to vendor, and a fresh CI machine cannot
# fetch it. As root the tests run as `nobody` (nginx's workers must read the test
# directories that the tests create with mode 0700). Needs perl and prove (Debian: perl);
# tests whose modules or tools are missing skip themselves, alike in the three runs.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tests=$(cd "${1:?usage: run.sh PATH-TO-NGINX-TESTS}" && pwd)
[ -f "$tests/lib/Test/Nginx.pm" ] || { echo "nginx-tests: $tests has no lib/Test/Nginx.pm" >&2; exit 2; }
jobs=${NGINX_TESTS_JOBS:-$(nproc)}
only=${NGINX_TESTS_ONLY:-.}

make -C "$repo" build >/dev/null
work=$(mktemp -d /tmp/ngx-gpu-nginx-tests.XXXXXX)
cp "$repo/build/sbin/nginx" "$repo/build/modules/ngx_http_gpu_module.so" "$work/"
as=()
if [ "$(id -u)" = 0 ]; then
    as=(runuser -u nobody --)
fi

# NVRTC (t/nvrtc.sh) beside them, so that each configuration load compiles the kernels in
# its compile child, as on a GPU machine.
mkdir -p "$work/nvrtc" && cp "$(sh "$repo/t/nvrtc.sh")"/libnvrtc* "$work/nvrtc/"
chmod -R a+rX "$work"

load="load_module $work/ngx_http_gpu_module.so;"
# The GPU thread falls back to the CPU path where there is no GPU; the unix socket keeps
# the extra server off the tests' ports.
active="server { listen unix:%%TESTDIR%%/ngx-gpu.sock; location / { gpu_process echo; gpu_fallback cpu; } }"

run() { # name, then VAR=value ...
    local name=$1
    shift
    echo "nginx-tests: $name run ($jobs jobs)" >&2
    (cd "$tests" && "${as[@]}" env TEST_NGINX_BINARY="$work/nginx" "$@" \
        prove -j"$jobs" $only >"$work/$name.log" 2>&1) || true
    # "file failed-subtests" for every file that failed, from prove's summary.
    awk '/^Test Summary Report/{p=1} p && /^[^ ].*\.t /{f=$1; print f, "(exit)"} p && /Failed tests?:/{print f, $0}' \
        "$work/$name.log" | sort -u >"$work/$name.failed"
    echo "nginx-tests: $name: $(tail -n 2 "$work/$name.log" | tr '\n' ' ')" >&2
}

run plain
run loaded TEST_NGINX_GLOBALS="$load"
run active TEST_NGINX_GLOBALS="$load" TEST_NGINX_GLOBALS_HTTP="$active" \
    LD_LIBRARY_PATH="$work/nvrtc"

status=0
for name in loaded active; do
    new=$(comm -13 "$work/plain.failed" "$work/$name.failed")
    if [ -n "$new" ]; then
        echo "nginx-tests: FAILED with the module $name, passing without it:" >&2
        echo "$new" >&2
        status=1
    else
        echo "nginx-tests: module $name: no test fails that passes without it" >&2
    fi
done
rm -rf "$work/nvrtc"
echo "nginx-tests: logs in $work" >&2
exit $status
