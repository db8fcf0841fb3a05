#!/usr/bin/env bash
# AddressSanitizer over the integration suites: nginx (nginx-sys's vendored build, GCC
# -fsanitize=address) and the module (rustc -Zsanitizer=address, through RUSTC_BOOTSTRAP=1
# on the stable toolchain) both instrumented, then the suites' test binaries, built as
# usual, run against that nginx and module; any ASan report fails the run.
#
#   bash t/asan/run.sh                       (make asan) every suite
#   bash t/asan/run.sh body stress           some suites
#   bash t/asan/run.sh body -- NAME          arguments after -- go to each test binary
#
# The module is a cdylib: rustc links no sanitizer runtime into it, its __asan_* calls
# resolve at load time against the libasan that nginx links (GCC's; the instrumentation
# ABI, v8, is the same). A self-check proves that before anything long runs: a small
# instrumented Rust cdylib (t/asan/probe.rs), loaded by a GCC-ASan host, must be caught
# at a use-after-free, heap, global and stack overflow.
#
# Works in <target>/asan (its own cargo target directory: the normal build is untouched);
# reports and logs in <target>/asan/run/ (the reports are written under $TMPDIR first: see
# below).
#
#   NGX_GPU_STRESS_SECS  reloads in the stress suite's reload test (default here 10)
#   ASAN_EXTRA_OPTIONS   more ASAN_OPTIONS, appended (e.g. quarantine_size_mb=1024)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi

say() { printf 'asan: %s\n' "$*" >&2; }
fail() {
    printf '\nasan: FAILED: %s\n' "$*" >&2
    exit 1
}

all_suites=(http body batching config faults stress)
suites=()
test_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --) shift; test_args=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) suites+=("$1"); shift ;;
    esac
done
[ ${#suites[@]} -gt 0 ] || suites=("${all_suites[@]}")
for s in "${suites[@]}"; do
    [[ " ${all_suites[*]} " == *" $s "* ]] || fail "no suite $s (suites: ${all_suites[*]})"
done
wants_faults=0
[[ " ${suites[*]} " == *" faults "* ]] && wants_faults=1

for tool in cargo rustc gcc python3 nm curl; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found (sh t/deps.sh --tests)"
done

started=$SECONDS
triple=$(rustc -vV | sed -n 's/^host: //p')
[ "$triple" = x86_64-unknown-linux-gnu ] \
    || say "host $triple: only x86_64-unknown-linux-gnu is tested"

target=$(cargo metadata --format-version 1 --no-deps | python3 -c \
    'import json, sys; print(json.load(sys.stdin)["target_directory"])')
work=$target/asan
run=$work/run
rm -rf "$run"
mkdir -p "$run/reports" "$run/logs" "$run/module" "$run/fault-injection" "$run/probe"

# Where ASan writes its reports. nginx's workers write them, and started as root nginx
# runs its workers as nobody: a directory they cannot write or reach (a tree under /root,
# a target dir of mode 755) loses the report ("ERROR: Can't open file: ... (reason: 13)"
# on stderr, the worker exits with code 1, nginx starts another one, the test may pass).
# So: world-writable directories under $TMPDIR, copied into $run/reports at the end.
reports=$(mktemp -d "${TMPDIR:-/tmp}/ngx-gpu-asan.XXXXXX")
chmod 0755 "$reports"
trap 'rm -rf "$reports"' EXIT
# A directory for one suite's reports: writable by nginx's workers, whatever user.
report_dir() {
    mkdir -p "$reports/$1"
    chmod 0777 "$reports/$1"
    if [ "$(id -u)" = 0 ] && command -v runuser >/dev/null 2>&1 \
        && ! runuser -u nobody -- test -w "$reports/$1"; then
        fail "nginx's workers (user nobody) cannot write ASan reports into $reports/$1"
    fi
    printf '%s' "$reports/$1"
}

# nginx: nginx-sys builds its bundled nginx with these (configure --with-cc-opt/--with-ld-opt).
# Only in the ASan build's environment: nginx-src reruns on them, and the normal build of
# the test binaries would otherwise build its nginx with ASan too.
asan_cflags="-fsanitize=address -fno-omit-frame-pointer -g -O1"
asan_ldflags="-fsanitize=address"
# The module: only the target crates get RUSTFLAGS (explicit --target), not build scripts
# or proc macros, which run on the host uninstrumented. Legacy symbol names: GCC's libasan
# demangles those (Itanium-like), not v0 (the default), in the reports' frames.
asan_rustflags="-Zsanitizer=address -Cforce-frame-pointers=yes"
asan_rustflags+=" -Zunstable-options -Csymbol-mangling-version=legacy"

# What ASan does in nginx: reports into files (one per process), per suite; leaks not
# reported (nginx frees its pools only in part at exit); the worker that hits an error
# exits (nginx's master logs it and starts another), nothing aborts.
asan_options() {
    local opts="log_path=$1/asan:detect_leaks=0:abort_on_error=0:halt_on_error=1"
    opts+=":detect_stack_use_after_return=1"
    [ -n "${ASAN_EXTRA_OPTIONS:-}" ] && opts+=":$ASAN_EXTRA_OPTIONS"
    printf '%s' "$opts"
}

# --- self-check: an instrumented Rust cdylib inside a GCC-ASan host -----------------

t0=$SECONDS
say "self-check: instrumented Rust cdylib (t/asan/probe.rs) in a GCC-ASan host"
gcc -fsanitize=address -fno-omit-frame-pointer -g -O1 t/asan/probe-host.c \
    -o "$run/probe/host" -ldl
# shellcheck disable=SC2086 # the flags are words
RUSTC_BOOTSTRAP=1 rustc --edition 2021 -O $asan_rustflags -Cdebuginfo=line-tables-only \
    --crate-type cdylib --target "$triple" t/asan/probe.rs -o "$run/probe/libprobe.so"
nm -D --undefined-only "$run/probe/libprobe.so" | grep -q ' __asan_init$' \
    || fail "rustc -Zsanitizer=address left no __asan_init reference in the probe"
kinds=(heap-use-after-free heap-buffer-overflow global-buffer-overflow stack-buffer-overflow)
for k in 0 1 2 3; do
    out=$(ASAN_OPTIONS=detect_leaks=0 "$run/probe/host" "$run/probe/libprobe.so" $k 2>&1 || true)
    grep -q "ERROR: AddressSanitizer: ${kinds[$k]} " <<<"$out" \
        || fail "the probe's ${kinds[$k]} went unreported: the Rust instrumentation does not work with GCC's libasan:
$out"
    grep -qE '#0 0x[0-9a-f]+ in probe .*probe\.rs:[0-9]+' <<<"$out" \
        || fail "the probe's ${kinds[$k]} report has no probe.rs frame:
$out"
done
t_probe=$((SECONDS - t0))
say "self-check: all ${#kinds[@]} kinds reported in the Rust code (${t_probe}s)"

# --- nginx and the module, instrumented ---------------------------------------------

# Prints "nginx <path>" and "module <path>" from cargo's JSON messages.
artifacts() {
    python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "build-script-executed" and "#nginx-sys@" in m["package_id"]:
        print("nginx", m["out_dir"] + "/objs/nginx")
    elif (m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ngx_http_gpu_module"
            and "cdylib" in m["target"]["kind"]):
        print("\n".join("module " + f for f in m["filenames"] if f.endswith(".so")))
'
}

# Line tables through the profile, not -Cdebuginfo: a release profile without debug info
# also strips it (strip = "debuginfo"), and the reports' Rust frames had no file:line.
asan_build() {
    NGX_CFLAGS=$asan_cflags NGX_LDFLAGS=$asan_ldflags RUSTC_BOOTSTRAP=1 RUSTFLAGS="$asan_rustflags" \
        CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --locked \
        --target "$triple" --target-dir "$work" --message-format=json-render-diagnostics "$@" \
        | artifacts
}

t0=$SECONDS
say "building nginx and the module with ASan (target dir $work)"
built=$(asan_build) || fail "the ASan build failed"
nginx=$(sed -n 's/^nginx //p' <<<"$built")
so=$(sed -n 's/^module //p' <<<"$built")
[ -x "$nginx" ] || fail "no nginx from the ASan build (got: $built)"
[ -f "$so" ] || fail "no module from the ASan build (got: $built)"
cp "$so" "$run/module/ngx_http_gpu_module.so"
module=$run/module/ngx_http_gpu_module.so
fault_module=
if [ $wants_faults = 1 ]; then
    say "building the fault-injection module with ASan"
    built=$(asan_build --features fault-injection) || fail "the ASan fault-injection build failed"
    so=$(sed -n 's/^module //p' <<<"$built")
    [ -f "$so" ] || fail "no fault-injection module from the ASan build (got: $built)"
    cp "$so" "$run/fault-injection/ngx_http_gpu_module.so"
    fault_module=$run/fault-injection/ngx_http_gpu_module.so
fi
t_build=$((SECONDS - t0))

# nginx links GCC's libasan; each module's __asan_* references resolve in it.
libasan=$(ldd "$nginx" | awk '/libasan\.so/ { print $3 }')
[ -n "$libasan" ] || fail "$nginx does not link libasan (NGX_CFLAGS/NGX_LDFLAGS not applied?)"
nm -D --defined-only "$libasan" | awk '{ print $3 }' | sort -u > "$run/libasan.syms"
for m in "$module" $fault_module; do
    nm -D --undefined-only "$m" | awk '$2 ~ /^__asan_/ { print $2 }' | sort -u > "$run/module.syms"
    grep -qx __asan_init "$run/module.syms" || fail "$m is not instrumented (no __asan_init)"
    missing=$(comm -23 "$run/module.syms" "$run/libasan.syms")
    [ -z "$missing" ] || fail "$libasan lacks what $m calls: $missing"
done
say "nginx: $nginx (links $libasan)"
say "module: $module ($(wc -l < "$run/module.syms") __asan_* symbols, all in $(basename "$libasan"))"

# Loads: nginx -t with the module, before the suites.
pre=$run/preflight
mkdir -p "$pre/conf" "$pre/logs"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$pre/conf/nginx.conf" <<EOF
load_module $module;
events {}
http { server { listen 127.0.0.1:$port; location = /b { gpu_process blake3; } } }
EOF
dir=$(report_dir preflight)
out=$(ASAN_OPTIONS=$(asan_options "$dir") \
    "$nginx" -p "$pre" -c conf/nginx.conf -e logs/error.log -t 2>&1) \
    || fail "the ASan nginx does not load the ASan module:
$out"

# --- the suites' test binaries (the normal build) -----------------------------------

t0=$SECONDS
say "building the test binaries (cargo test --release --no-run)"
exes=$(cargo test --release --locked --no-run --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["target"]["kind"] == ["test"]):
        print(m["target"]["name"], m["executable"])
') || fail "cargo test --no-run failed"
t_tests_build=$((SECONDS - t0))

# --- the suites against the ASan nginx and module ------------------------------------

export NGX_GPU_NGINX=$nginx NGX_GPU_MODULE=$module
if [ -n "$fault_module" ]; then
    export NGX_GPU_FAULT_MODULE=$fault_module
fi
export NGX_GPU_STRESS_SECS=${NGX_GPU_STRESS_SECS:-10}

passed=0
failed=()
times=()
for name in "${suites[@]}"; do
    exe=$(awk -v n="$name" '$1 == n { print $2 }' <<<"$exes")
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then
        fail "no test binary for the $name suite (got: $exes)"
    fi
    dir=$(report_dir "$name")
    log=$run/logs/$name.log
    say "suite $name: $(basename "$exe") ${test_args[*]}"
    t0=$SECONDS
    rc=0
    ASAN_OPTIONS=$(asan_options "$dir") "$exe" "${test_args[@]}" >"$log" 2>&1 || rc=$?
    times+=("$name $((SECONDS - t0))s")
    result=$(grep -E '^test result' "$log" | tail -n1 || true)
    say "suite $name: ${result:-no result} (rc=$rc, $((SECONDS - t0))s, log $log)"
    if [ $rc = 0 ]; then
        passed=$((passed + 1))
    else
        failed+=("$name")
        grep -E -A30 '^---- |^failures:' "$log" | head -n 80 >&2 || tail -n 40 "$log" >&2
    fi
done

# --- the reports ---------------------------------------------------------------------

cp -R "$reports/." "$run/reports/"
mapfile -t found < <(find "$run/reports" -type f -name 'asan.*' | sort)
if [ ${#found[@]} -gt 0 ]; then
    printf '\nasan: %d report(s) under %s\n' "${#found[@]}" "$run/reports" >&2
    i=0
    for r in "${found[@]}"; do
        i=$((i + 1))
        if [ $i -le 3 ]; then
            printf '\n======== %s\n' "${r#"$run/reports/"}" >&2
            cat "$r" >&2
        else
            printf '%s: %s\n' "${r#"$run/reports/"}" "$(grep -m1 'ERROR: AddressSanitizer' "$r" || head -n1 "$r")" >&2
        fi
    done
fi

say "times: self-check ${t_probe}s, ASan build ${t_build}s, test build ${t_tests_build}s, suites: ${times[*]}; total $((SECONDS - started))s"
if [ ${#failed[@]} -gt 0 ] || [ ${#found[@]} -gt 0 ]; then
    echo "asan: FAILED: $passed suites passed, ${#failed[@]} failed${failed[*]:+ (${failed[*]})}, ${#found[@]} reports"
    exit 1
fi
echo "asan: $passed suites passed, 0 reports"
