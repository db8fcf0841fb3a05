#!/usr/bin/env bash
# Install test: proof that the README's install step, t/deps.sh, installs what the build
# needs. A clean Debian 12 root filesystem (debootstrap minbase plus package lists: no make,
# no compiler, no library headers) gets a copy of this working tree, and in it (chroot):
#   - as a user (there is no sudo), `sh t/deps.sh --tests` fails and names what is missing
#   - as root, `sh t/deps.sh` installs the build's packages; run again, it installs nothing
#   - with only those packages the build succeeds (`make -o deps build`: the Makefile's
#     build recipe, its deps target held back), then `make build` (its deps target,
#     `sh t/deps.sh --tests`, adds the tests' packages)
#   - build/sbin/nginx and build/modules/ngx_http_gpu_module.so exist, and
#     `nginx -t` passes with the example config (the module loads; no GPU: CPU fallback)
#   - as the user again, `sh t/deps.sh --tests` passes with no root, installing nothing
# Rust is a prerequisite the README names, not something t/deps.sh installs: the host's
# rustup toolchain is bind-mounted read-only, crates come from `cargo vendor` (into
# docker/vendor/, as for the image test) and cargo runs --frozen, so the build is offline.
# The build is the release build `make build` does, from nothing every run: a kept target/
# would skip nginx's C build, which is what needs the packages.
#
#   bash t/install/test.sh     (make install-test, the last part of make test; root or sudo)
#
# Cache, shared with the image test: the debootstrap tarball and the downloaded .deb files
# (apt's archive folder, so that a later run installs the same way but downloads less),
# under $NGX_IMAGE_CACHE (/var/cache/ngx-gpu-image). Logs: target/install/; the scratch
# root filesystem target/install/root is removed after a passing run and kept after a
# failing one. Every mount is made in a mount namespace of the test's own, so none outlives
# it, and is also undone on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
. t/image/env.sh

WORK=$PWD/target/install
ROOT=$WORK/root
DEBS=$NGX_IMAGE_CACHE/install-debs
TEST_USER=builder
# PATH in the chroot: the toolchain's bin first, where rustup's proxies would be.
CPATH_=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - T0))"; }

passed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }

# fail WHY [LOG]: the log's tail, the reason, the summary; exit 1.
fail() {
    if [ -n "${2:-}" ]; then
        echo "---- last lines of $2 ----"
        tail -n 40 "$2" 2>/dev/null || true
        echo "----"
    fi
    echo "INSTALL TEST FAILED: $1"
    [ -d "$ROOT" ] && echo "(the root filesystem is kept for a look: $ROOT)"
    echo "install: $passed passed, 1 failed"
    exit 1
}

# Mounts under the scratch root (in this mount namespace), deepest first.
mounts_under_root() {
    awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo \
        | sort -r
}

main() {
    T0=$(date +%s)
    mkdir -p "$WORK"
    # Nothing may be mounted under the old root before it is deleted (a bind mount of the
    # toolchain or of the .deb cache would be deleted with it).
    [ -z "$(mounts_under_root)" ] || fail "mounts left under $ROOT: $(mounts_under_root)"
    $SUDO rm -rf "$ROOT" "$WORK"/*.log

    step "clean Debian 12 root filesystem (debootstrap minbase tarball)"
    ensure_minbase_tarball "$WORK/debootstrap.log" \
        || fail "no debootstrap tarball" "$WORK/debootstrap.log"
    $SUDO mkdir -p "$ROOT"
    $SUDO tar -C "$ROOT" --numeric-owner -xf "$MINBASE_TARBALL"
    $SUDO chmod 755 "$ROOT" # a tarball made before env.sh set it has mktemp's 0700
    # The machine's name servers, as a container runtime would give them.
    $SUDO cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    echo "$MINBASE_TARBALL ($(du -h "$MINBASE_TARBALL" | cut -f1)) extracted into $ROOT"

    step "Rust from the host (rustup toolchain), crates vendored"
    local sysroot
    command -v cargo >/dev/null && sysroot=$(rustc --print sysroot) \
        || fail "cargo/rustc not found: install Rust with rustup (https://rustup.rs)"
    [ -x "$sysroot/bin/cargo" ] || fail "no cargo in the toolchain $sysroot"
    echo "toolchain: $sysroot ($("$sysroot/bin/cargo" --version))"
    cargo vendor --locked docker/vendor >/dev/null 2>"$WORK/vendor.log" \
        || fail "cargo vendor" "$WORK/vendor.log"
    echo "crates: docker/vendor ($(ls docker/vendor | wc -l) crates)"

    step "this working tree copied in (without target/, build/, docker/vendor/, .git)"
    $SUDO mkdir -p "$ROOT/src"
    tar -C . --exclude=./target --exclude=./build --exclude=./docker/vendor --exclude=./.git \
        --exclude=./.gpu --exclude=./.gpu-image -cf - . \
        | $SUDO tar -C "$ROOT/src" --no-same-owner -xf -
    # The tree's top directory comes with the clone's mode (0700 under mktemp -d): the
    # test's user must enter it, as a user's own checkout lets them.
    $SUDO chmod 755 "$ROOT/src"
    $SUDO mkdir -p "$DEBS"

    local rc=0
    # sudo drops the environment: the cache's place goes along explicitly.
    $SUDO env T0="$T0" NGX_IMAGE_CACHE="$NGX_IMAGE_CACHE" \
        unshare --mount --propagation private -- \
        bash "$PWD/t/install/test.sh" inside "$sysroot" "$PWD/docker/vendor" || rc=$?
    if [ "$rc" = 0 ]; then
        $SUDO rm -rf "$ROOT"
    fi
    exit "$rc"
}

# ---- inside a mount namespace of its own, as root ----

cleanup() {
    local m
    for m in $(mounts_under_root); do umount "$m" || umount -l "$m" || true; done
}

# in_root CMD...: run CMD in the chroot, in /src, as root, with a clean environment.
in_root() {
    chroot "$ROOT" env -i HOME=/root PATH="$CPATH_" TERM=dumb sh -c 'cd /src && exec "$@"' sh "$@"
}

# as_user CMD...: the same as the test's non-root user (no sudo in the chroot).
as_user() {
    chroot --userspec="$uid:$uid" --groups="$uid" "$ROOT" \
        env -i HOME="/home/$TEST_USER" USER="$TEST_USER" PATH="$CPATH_" TERM=dumb \
        sh -c 'cd /src && exec "$@"' sh "$@"
}

installed() { in_root dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

inside() {
    local sysroot=$1 vendor=$2
    trap cleanup EXIT
    mount -t proc proc "$ROOT/proc"
    mount -t sysfs -o ro sysfs "$ROOT/sys"
    mount --bind /dev "$ROOT/dev"
    mkdir -p "$ROOT/opt/rust" "$ROOT/opt/vendor"
    mount --bind -o ro "$sysroot" "$ROOT/opt/rust"
    mount --bind -o ro "$vendor" "$ROOT/opt/vendor"
    mount --bind "$DEBS" "$ROOT/var/cache/apt/archives"
    # cargo: crates.io replaced by the vendored crates, never the network.
    mkdir -p "$ROOT/root/.cargo"
    cat >"$ROOT/root/.cargo/config.toml" <<'EOF'
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "/opt/vendor"

[net]
offline = true
EOF

    # The packages t/deps.sh names, read from it: what must be there afterwards.
    local build tests p missing=""
    build=$(sed -n 's/^build="\(.*\)"$/\1/p' t/deps.sh)
    tests=$(sed -n 's/^tests="\(.*\)"$/\1/p' t/deps.sh)
    [ -n "$build" ] && [ -n "$tests" ] || fail "cannot read the package lists of t/deps.sh"

    step "apt-get update in the chroot (package lists only)"
    in_root apt-get update -qq >"$WORK/apt-update.log" 2>&1 \
        || fail "apt-get update in the chroot" "$WORK/apt-update.log"
    local tools=""
    for p in make cc gcc clang pkg-config sudo; do
        in_root sh -c "command -v $p" >/dev/null && tools="$tools $p"
    done
    [ -z "$tools" ] || fail "the root filesystem is not clean: it has$tools"
    for p in $build $tests; do installed "$p" || missing="$missing $p"; done
    pass "clean Debian 12: no make, cc, pkg-config or sudo; not installed:$missing"

    step "as a user, before the install: sh t/deps.sh --tests"
    in_root useradd --create-home --shell /bin/sh "$TEST_USER"
    uid=$(awk -F: -v u="$TEST_USER" '$1 == u { print $3 }' "$ROOT/etc/passwd")
    local log=$WORK/deps-user-missing.log
    if as_user sh t/deps.sh --tests >"$log" 2>&1; then
        fail "t/deps.sh --tests passed as a user with packages missing" "$log"
    fi
    grep -q "^t/deps.sh: missing packages:.*; run as root or install sudo" "$log" \
        || fail "t/deps.sh gave no clear message on missing packages" "$log"
    for p in $missing; do
        grep -qw -- "$p" "$log" || fail "t/deps.sh's message does not name $p" "$log"
    done
    grep -q "installing:" "$log" && fail "t/deps.sh tried to install as a user" "$log"
    cat "$log"
    pass "as a user it fails and names the missing packages"

    step "as root: sh t/deps.sh (the README's install step)"
    log=$WORK/deps-root.log
    in_root sh t/deps.sh >"$log" 2>&1 || fail "sh t/deps.sh failed as root" "$log"
    grep "installing:" "$log" || fail "sh t/deps.sh installed nothing" "$log"
    for p in $build; do installed "$p" || fail "sh t/deps.sh did not install $p" "$log"; done
    pass "sh t/deps.sh installed:$build"

    log=$WORK/deps-root-again.log
    in_root sh t/deps.sh >"$log" 2>&1 || fail "sh t/deps.sh failed the second time" "$log"
    grep -q "installing:" "$log" && fail "a second sh t/deps.sh installed again" "$log"
    pass "a second sh t/deps.sh installs nothing"

    step "build with only those packages: make -o deps build (release, offline)"
    log=$WORK/build.log
    in_root make -o deps build CARGO_FLAGS=--frozen >"$log" 2>&1 \
        || fail "the build failed with the packages sh t/deps.sh installed" "$log"
    grep -E 'Finished|Compiling nginx-sys' "$log" || true
    pass "make build succeeded with what sh t/deps.sh installed"

    step "make build (its deps target: sh t/deps.sh --tests)"
    log=$WORK/make-build.log
    in_root make build CARGO_FLAGS=--frozen >"$log" 2>&1 || fail "make build failed" "$log"
    grep -q "^sh t/deps.sh --tests" "$log" || fail "make build did not run t/deps.sh" "$log"
    grep "installing:" "$log" || true
    for p in $build $tests; do installed "$p" || fail "$p not installed after make build" "$log"; done
    pass "make build ran sh t/deps.sh --tests; all of $build $tests installed"

    step "artifacts and nginx -t"
    for p in build/sbin/nginx build/modules/ngx_http_gpu_module.so build/conf/nginx.conf; do
        [ -s "$ROOT/src/$p" ] || fail "make build left no $p"
    done
    [ -x "$ROOT/src/build/sbin/nginx" ] || fail "build/sbin/nginx is not executable"
    pass "build/sbin/nginx, build/modules/ngx_http_gpu_module.so, build/conf/nginx.conf"

    log=$WORK/nginx-t.log
    in_root build/sbin/nginx -p build -t -c conf/nginx.conf >"$log" 2>&1 \
        || fail "nginx -t failed" "$log"
    grep -q "syntax is ok" "$log" && grep -q "test is successful" "$log" \
        || fail "nginx -t did not say the test is successful" "$log"
    grep -E '\[(emerg|alert|crit|error)\]' "$log" && fail "nginx -t logged errors" "$log"
    cut -c1-120 "$log"
    pass "nginx -t with conf/nginx.conf: the module loads"

    step "as the user, everything present: sh t/deps.sh --tests"
    log=$WORK/deps-user-present.log
    as_user sh t/deps.sh --tests >"$log" 2>&1 \
        || fail "t/deps.sh --tests failed as a user with everything installed" "$log"
    grep -q "installing:" "$log" && fail "t/deps.sh --tests installed again" "$log"
    pass "as a user, sh t/deps.sh --tests exits 0 and asks for no root"

    echo "install test took $(($(date +%s) - T0))s"
    echo "install: $passed passed, 0 failed"
}

case "${1:-}" in
    inside) shift; inside "$@" ;;
    "") main ;;
    *) echo "usage: $0" >&2; exit 2 ;;
esac
