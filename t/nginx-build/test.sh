#!/usr/bin/env bash
# The distribution's way of building the module, tested: nginx's own
#   ./configure --with-compat ... --add-dynamic-module=<this repository> && make
# on the nginx source bundled in the nginx-src crate, then the integration suites
# (t/http.rs, t/config.rs) run against THAT nginx binary and THAT module .so.
#
#   bash t/nginx-build/test.sh          (make nginx-build-test)
#
# Needs what t/deps.sh --tests installs, and cargo; network only for crates.io.
# Works in target/nginx-build/ (kept: a second run skips configure when its inputs
# did not change, and make and cargo rebuild only what changed).
#
#   NGX_BUILD_JOBS   make -j for the nginx build (default 2)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi

say() { printf 'nginx-build: %s\n' "$*" >&2; }
fail() {
    printf '\nnginx-build: FAILED: %s\n' "$*" >&2
    exit 1
}

for tool in cargo make cc python3 curl; do
    command -v "$tool" >/dev/null 2>&1 \
        || fail "$tool not found (install the test dependencies: sh t/deps.sh --tests)"
done

jobs=${NGX_BUILD_JOBS:-2}
started=$SECONDS

# Prints one field of `cargo metadata`: "target" (the target directory) or "nginx-src"
# (the manifest of the nginx-src package this lock file resolves to).
metadata() {
    cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
if sys.argv[1] == "target":
    print(m["target_directory"])
else:
    print("\n".join(p["manifest_path"] for p in m["packages"] if p["name"] == "nginx-src"))
' "$1"
}

# --- the nginx source --------------------------------------------------------------

say "fetching crates (cargo fetch --locked)"
cargo fetch --locked

manifest=$(metadata nginx-src)
[ -n "$manifest" ] || fail "no nginx-src package in cargo metadata (is the vendored feature gone?)"
[ "$(printf '%s\n' "$manifest" | wc -l)" = 1 ] || fail "more than one nginx-src package: $manifest"
src=$(dirname "$manifest")/nginx
if [ ! -f "$src/src/core/nginx.h" ] || [ ! -f "$src/auto/configure" ]; then
    fail "no nginx source tree at $src"
fi
version=$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$src/src/core/nginx.h")
[ -n "$version" ] || fail "no NGINX_VERSION in $src/src/core/nginx.h"

work=$(metadata target)/nginx-build
tree=$work/nginx-$version

# A copy, never the registry's tree itself: configure and make write into the tree
# they run in (and nginx-sys's vendored build uses that one).
if [ "$(cat "$work/source" 2>/dev/null)" != "$src" ] || [ ! -f "$tree/auto/configure" ]; then
    say "copying nginx $version from $src"
    rm -rf "$work"
    mkdir -p "$work"
    cp -R "$src" "$tree"
    # A Makefile left there by a vendored build names that build's directories.
    rm -f "$tree/Makefile"
    chmod -R u+w "$tree"
    printf '%s\n' "$src" > "$work/source"
fi

# --- configure and make ------------------------------------------------------------

# Debian 12's OpenSSL, PCRE2 and zlib (http_ssl, pcre, gzip) from the system paths.
configure_args=(
    --with-compat
    --with-threads
    --with-http_v2_module
    --with-http_ssl_module
    --with-pcre
    "--add-dynamic-module=$repo"
)

# configure again only when its arguments or the module's build files changed: a fresh
# objs/Makefile makes nginx-sys generate its bindings again, and cargo rebuild the crate.
stamp=$({
    printf '%s\n' "${configure_args[@]}" "NGX_CARGO=${NGX_CARGO:-}" "NGX_RUSTC_OPT=${NGX_RUSTC_OPT:-}"
    cat "$repo/config" "$repo/config.make" "$repo/auto/rust"
} | sha256sum | cut -d' ' -f1)

t0=$SECONDS
if [ "$(cat "$work/configured" 2>/dev/null)" = "$stamp" ] && [ -f "$tree/objs/Makefile" ]; then
    say "configure: skipped (arguments and module build files unchanged)"
else
    rm -f "$work/configured"
    say "configure ${configure_args[*]}"
    (cd "$tree" && auto/configure "${configure_args[@]}") > "$work/configure.log" 2>&1 \
        || { tail -n 30 "$work/configure.log" >&2; fail "configure failed (log: $work/configure.log)"; }
    grep -q '+ ngx_http_gpu_module was configured' "$work/configure.log" \
        || fail "configure did not add ngx_http_gpu_module (log: $work/configure.log)"
    printf '%s\n' "$stamp" > "$work/configured"
fi
t_configure=$((SECONDS - t0))

nginx=$tree/objs/nginx
module=$tree/objs/ngx_http_gpu_module.so

# Never test what an earlier run left: this make must link both again.
rm -f "$nginx" "$tree"/objs/*.so

t0=$SECONDS
say "make -j$jobs (nginx and modules; cargo builds the module's static library)"
make -C "$tree" -j"$jobs" > "$work/make.log" 2>&1 \
    || { tail -n 40 "$work/make.log" >&2; fail "make failed (log: $work/make.log)"; }
t_make=$((SECONDS - t0))

[ -x "$nginx" ] || fail "make built no $nginx"
[ -f "$module" ] || fail "make built no $module"
grep -q -- "--add-dynamic-module=$repo" <("$nginx" -V 2>&1) \
    || fail "$nginx -V does not show --add-dynamic-module=$repo"

# The module table comes from nginx's generated C, and it is all the .so exports
# (auto/exports.map): nginx loads modules RTLD_GLOBAL, and the Rust library's symbols must
# not be visible to other modules.
syms=$(nm -D --defined-only "$module" | awk '{print $3}' | sort)
want=$(printf '%s\n' ngx_module_names ngx_module_order ngx_modules)
[ "$syms" = "$want" ] || fail "$module exports other symbols than the module table: $(echo $syms | head -c 300)"
all_syms=$(nm "$module")
grep -qw ngx_http_gpu_module <<<"$all_syms" || fail "$module has no ngx_http_gpu_module"

# Loads into that nginx: the check that names the problem (dlopen error, binary
# incompatibility, unknown directive) before the suites run.
pre=$work/preflight
rm -rf "$pre"
mkdir -p "$pre/conf" "$pre/logs"
# nginx -t binds the listen address too: a free port (any user may bind it).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$pre/conf/nginx.conf" <<EOF
load_module $module;
events {}
http { server { listen 127.0.0.1:$port; location = /b { gpu_process blake3; } } }
EOF
out=$("$nginx" -p "$pre" -c conf/nginx.conf -e logs/error.log -t 2>&1) \
    || fail "the configure-built nginx does not load the configure-built module:
$out"
say "$nginx loads $module (nginx -t)"

# --- the integration suites against that build -------------------------------------

t0=$SECONDS
say "building the test binaries (cargo test --release --no-run)"
exes=$(cargo test --release --no-run --locked --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["target"]["kind"] == ["test"] and m["target"]["name"] in ("http", "config")):
        print(m["executable"])
') || fail "cargo test --no-run failed"
t_tests_build=$((SECONDS - t0))

suites=0
t0=$SECONDS
for name in http config; do
    exe=$(grep -E "/deps/$name-[0-9a-f]+$" <<<"$exes" || true)
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then
        fail "no test binary for the $name suite (got: $exes)"
    fi
    say "suite $name: $(basename "$exe") against $nginx and $module"
    NGX_GPU_NGINX=$nginx NGX_GPU_MODULE=$module "$exe" \
        || fail "the $name suite failed against the configure-built nginx and module"
    suites=$((suites + 1))
done
t_suites=$((SECONDS - t0))

say "times: configure ${t_configure}s, make ${t_make}s, test build ${t_tests_build}s, suites ${t_suites}s, total $((SECONDS - started))s"
echo "nginx-build: $suites suites passed (nginx $version, ./configure --with-compat --add-dynamic-module, make)"
