#!/usr/bin/env bash
# Image test: builds docker/Dockerfile with buildah, then runs the image's nginx with the
# image's own configuration and talks HTTP to it. No Docker engine or registry is needed:
# the two bases are Debian bookworm made here with debootstrap (the builder one with
# Debian's cargo 1.96 added, standing in for rust:1-slim-bookworm; the runtime one standing
# in for the CUDA runtime base, so there is no libnvrtc and no GPU: the CPU fallback
# answers). Crates come from `cargo vendor` into docker/vendor/, so the build is offline.
#
#   bash t/image/test.sh     (make image-test, and the last part of make test; root or sudo)
#
# The debootstrap tarball and buildah's store (with --layers cache) live under
# $NGX_IMAGE_CACHE (/var/cache/ngx-gpu-image), so later runs reuse them; delete that
# folder for a run from scratch. Build log and the run's output: target/image/.
set -euo pipefail
cd "$(dirname "$0")/../.."
. t/image/env.sh

WORK=$PWD/target/image
PORT=8080 # what the image's config listens on (in a network namespace of the test's own)

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

ensure_tools() {
    local need="" p
    for p in buildah debootstrap b3sum curl iproute2; do
        dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
    done
    if [ -n "$need" ]; then
        echo "installing:$need"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need
    fi
    command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup.rs)"; exit 1; }
}

# A minimal Debian bookworm root filesystem, imported as an image.
make_runtime_base() {
    have_image "$BASE_RUNTIME" && return
    ensure_minbase_tarball "$WORK/debootstrap.log"
    local ctr mnt
    ctr=$("${B[@]}" from scratch)
    mnt=$("${B[@]}" mount "$ctr")
    $SUDO tar -C "$mnt" --numeric-owner -xf "$MINBASE_TARBALL"
    "${B[@]}" umount "$ctr" >/dev/null
    "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd bash "$ctr"
    "${B[@]}" commit -q --rm --format docker "$ctr" "$BASE_RUNTIME" >/dev/null
}

# The runtime base plus Debian's cargo/rustc 1.96 (bookworm-security): what the Dockerfile
# expects of its builder base (a Debian with cargo on PATH, like rust:1-slim-bookworm).
make_builder_base() {
    have_image "$BASE_BUILDER" && return
    local ctr
    ctr=$("${B[@]}" from --pull=never "$BASE_RUNTIME")
    "${B[@]}" run --isolation chroot "$ctr" -- sh -c 'apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
          cargo-web >/dev/null && rm -rf /var/lib/apt/lists/* && cargo --version'
    "${B[@]}" commit -q --rm --format docker "$ctr" "$BASE_BUILDER" >/dev/null
}

build_image() {
    # The same Dockerfile as for users; only the bases differ. The builder stage is tagged
    # too, so that pruning below keeps its layers as the cache of the next run.
    local stage args=(--isolation chroot --layers --pull=never --format docker
        -f docker/Dockerfile --build-arg BUILDER_IMAGE="$BASE_BUILDER"
        --build-arg RUNTIME_IMAGE="$BASE_RUNTIME")
    : >"$WORK/build.log"
    for stage in "--target builder -t $IMAGE-builder" "-t $IMAGE"; do
        # shellcheck disable=SC2086 # two words each
        if ! "${B[@]}" bud "${args[@]}" $stage . >>"$WORK/build.log" 2>&1; then
            tail -n 60 "$WORK/build.log"
            if grep -qi 'no space left on device' "$WORK/build.log"; then
                # vfs copies every layer in full; stale stores and old builds add up.
                echo "out of disk: $(df -h --output=avail "$NGX_IMAGE_CACHE" | tail -n 1 | tr -d ' ') free" \
                    "where buildah's store is ($NGX_IMAGE_CACHE/storage, now" \
                    "$($SUDO du -sh "$NGX_IMAGE_CACHE/storage" 2>/dev/null | cut -f1));" \
                    "'${B[*]} rmi --prune' drops unused layers, deleting $NGX_IMAGE_CACHE starts over"
            fi
            echo "IMAGE TEST FAILED: the image did not build (log: $WORK/build.log)"
            exit 1
        fi
    done
    grep -E 'STEP [0-9]|^COMMIT|Using cache' "$WORK/build.log" | cut -c1-100 || true
    # vfs keeps every layer as a full copy: drop what no tagged image needs any more.
    "${B[@]}" rmi --prune >/dev/null || true
}

main() {
    mkdir -p "$WORK"
    step "tools"
    ensure_tools
    step "bases"
    make_runtime_base
    make_builder_base
    step "cargo vendor into docker/vendor"
    cargo vendor --locked docker/vendor >/dev/null 2>"$WORK/vendor.log" \
        || { cat "$WORK/vendor.log"; exit 1; }
    step "build $IMAGE"
    build_image
    step "run $IMAGE"
    # A network namespace of its own: port 8080 is free there whatever runs on the host.
    $SUDO env T0=$(($(date +%s) - SECONDS)) unshare --net -- bash "$PWD/t/image/test.sh" check
}

# ---- checks: run as root inside the private network namespace ----

passed=0
ctr=""
master=""
runner=""

pass() { passed=$((passed + 1)); echo "ok: $*"; }

fail() {
    echo
    echo "---- nginx stderr (error log) ----"; tail -n 40 "$WORK/stderr" 2>/dev/null || true
    echo "---- nginx stdout (access log) ----"; tail -n 20 "$WORK/stdout" 2>/dev/null || true
    echo "IMAGE TEST FAILED: $*"
    echo "image: $passed passed, 1 failed"
    exit 1
}

cleanup() {
    if [ -n "$master" ] && kill -0 "$master" 2>/dev/null; then kill -TERM "$master" || true; fi
    if [ -n "$runner" ]; then wait "$runner" 2>/dev/null || true; fi
    if [ -n "$ctr" ]; then "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; fi
}

# The image's metadata: what docker run would use.
inspect() { "${B[@]}" inspect --type image --format "$1" "$IMAGE"; }

check() {
    # Job control: bash would otherwise start the image's command with SIGQUIT ignored, and
    # its entrypoint (a shell) could not trap what it was started ignoring.
    set -m
    ip link set lo up
    trap cleanup EXIT
    "${B[@]}" rm ngx-gpu-image-test >/dev/null 2>&1 || true
    ctr=$("${B[@]}" from --pull=never --name ngx-gpu-image-test "$IMAGE")
    local mnt
    mnt=$("${B[@]}" mount "$ctr")

    [ "$(inspect '{{.Docker.Config.StopSignal}}')" = SIGQUIT ] || fail "STOPSIGNAL is not SIGQUIT"
    local env
    env=$(inspect '{{range .Docker.Config.Env}}{{.}} {{end}}')
    [[ " $env" == *" NVIDIA_DRIVER_CAPABILITIES=compute,utility "* ]] \
        || fail "NVIDIA_DRIVER_CAPABILITIES: $env"
    [[ " $env" == *" NVIDIA_VISIBLE_DEVICES="* ]] || fail "no NVIDIA_VISIBLE_DEVICES: $env"
    inspect '{{range $p, $_ := .Docker.Config.ExposedPorts}}{{$p}} {{end}}' | grep -qw 8080/tcp \
        || fail "port 8080 not exposed"
    pass "metadata: STOPSIGNAL SIGQUIT, NVIDIA_* set, 8080 exposed"

    # The command docker run would start: the entrypoint, then CMD as its arguments.
    local -a cmd entry
    read -r -a entry <<<"$(inspect '{{range .Docker.Config.Entrypoint}}{{.}} {{end}}')"
    [ "${entry[*]}" = /usr/local/bin/ngx-gpu-entrypoint ] || fail "ENTRYPOINT: ${entry[*]}"
    read -r -a cmd <<<"$(inspect '{{range .Docker.Config.Cmd}}{{.}} {{end}}')"
    [ "${cmd[*]}" = nginx ] || fail "CMD: ${cmd[*]}"
    cmd=("${entry[@]}" "${cmd[@]}")
    local run=("${B[@]}" run --isolation chroot "$ctr" --)

    "${run[@]}" "${cmd[@]}" -V >"$WORK/nginx-V" 2>&1 || fail "nginx -V: $(cat "$WORK/nginx-V")"
    grep -q 'nginx/1\.28\.3' "$WORK/nginx-V" && grep -q -- '--with-compat' "$WORK/nginx-V" \
        || fail "not nginx 1.28.3 --with-compat: $(cat "$WORK/nginx-V")"
    ! grep -q ngx-gpu-entrypoint "$WORK/nginx-V" || fail "the entrypoint tried MPS for nginx -V"
    pass "nginx 1.28.3 with --with-compat (nginx -V through the entrypoint, no MPS)"

    # NGX_GPU_MPS=on where MPS cannot start (no GPU, no MPS program here): fatal and clear.
    local rc=0
    "${run[@]}" env NGX_GPU_MPS=on "${cmd[@]}" >"$WORK/mps-on" 2>&1 || rc=$?
    [ "$rc" = 1 ] && grep -q 'ngx-gpu-entrypoint: MPS: not started: .*NGX_GPU_MPS=on: not starting nginx' \
        "$WORK/mps-on" && ! grep -q 'gpu: ' "$WORK/mps-on" \
        || fail "NGX_GPU_MPS=on without MPS: status $rc: $(cat "$WORK/mps-on")"
    pass "NGX_GPU_MPS=on without MPS: status 1, $(grep -o 'MPS: not started: .\{40\}' "$WORK/mps-on")..."

    if ! "${run[@]}" "${cmd[@]}" -t >"$WORK/nginx-t" 2>&1 \
        || ! grep -q "syntax is ok" "$WORK/nginx-t" \
        || ! grep -q "test is successful" "$WORK/nginx-t" \
        || grep -E '\[(emerg|alert|crit|error)\]' "$WORK/nginx-t"; then
        fail "nginx -t: $(cat "$WORK/nginx-t")"
    fi
    pass "the shipped config tests clean (module loaded)"

    rm -f "$mnt/run/nginx.pid"
    "${run[@]}" "${cmd[@]}" >"$WORK/stdout" 2>"$WORK/stderr" &
    runner=$!
    local i
    for i in $(seq 300); do
        [ -f "$mnt/run/nginx.pid" ] && [ "$(grep -c 'gpu: ' "$WORK/stderr")" -ge 2 ] && break
        kill -0 "$runner" 2>/dev/null || fail "nginx exited at start"
        sleep 0.1
    done
    master=$(cat "$mnt/run/nginx.pid" 2>/dev/null) || fail "no pid file"
    grep -q "gpu: " "$WORK/stderr" || fail "no worker logged its gpu line"

    # The entrypoint is nginx's parent (PID 1 in a container) and said in one line that it
    # goes on without MPS (the image has no MPS program: the NVIDIA Container Toolkit mounts
    # it from the host).
    local entrypoint
    entrypoint=$(awk '/^PPid:/ { print $2 }' "/proc/$master/status")
    grep -q ngx-gpu-entrypoint "/proc/$entrypoint/cmdline" || fail "nginx's parent is not the entrypoint"
    [ "$(grep -c 'ngx-gpu-entrypoint: ' "$WORK/stderr")" = 1 ] \
        && grep -q 'ngx-gpu-entrypoint: MPS: not started: no nvidia-cuda-mps-control on PATH .*; going on without it' \
            "$WORK/stderr" || fail "the entrypoint's line: $(grep entrypoint "$WORK/stderr")"
    pass "the entrypoint runs nginx, one line: $(grep -o 'MPS: not started: [^(]*' "$WORK/stderr")"

    # Each worker says why it has no GPU (no libnvrtc, no libcuda in this image).
    local why
    why=$(grep -o 'gpu: no usable GPU in this worker: .*' "$WORK/stderr" | sort -u || true)
    [ "$(grep -c 'gpu: no usable GPU in this worker: ' "$WORK/stderr")" -eq 2 ] \
        || fail "expected the no-GPU line from both workers"
    grep -qE 'gpu: no usable GPU in this worker: .*(libnvrtc|libcuda|nvrtc|driver)' <<<"$why" \
        || fail "the no-GPU line does not say why: $why"
    echo "   $why"
    pass "both workers log why there is no GPU"

    # Workers run as the image's unprivileged nginx user; the master as root.
    local uid p workers=0
    uid=$(awk -F: '$1 == "nginx" { print $3 }' "$mnt/etc/passwd")
    [ -n "$uid" ] && [ "$uid" != 0 ] || fail "no unprivileged nginx user in the image"
    for p in /proc/[0-9]*; do
        [ "$(awk '/^PPid:/ { print $2 }' "$p/status" 2>/dev/null)" = "$master" ] || continue
        grep -q 'nginx: worker process' "$p/cmdline" 2>/dev/null || continue
        [ "$(awk '/^Uid:/ { print $2 }' "$p/status")" = "$uid" ] || fail "worker $p is not uid $uid"
        workers=$((workers + 1))
    done
    [ "$workers" -eq 2 ] || fail "expected 2 workers as nginx, found $workers"
    pass "2 workers run as nginx (uid $uid)"

    local url=http://127.0.0.1:$PORT code
    code=$(curl -sS -o "$WORK/health" -w '%{http_code}' "$url/health") || fail "GET /health"
    [ "$code" = 200 ] && [ "$(cat "$WORK/health")" = ok ] || fail "GET /health: $code"
    local hc
    [ "$(inspect '{{index .Docker.Config.Healthcheck.Test 0}}')" = CMD ] || fail "no HEALTHCHECK"
    hc=$(inspect '{{range $i, $a := .Docker.Config.Healthcheck.Test}}{{if $i}}{{$a}}{{"\x00"}}{{end}}{{end}}' \
        | tr '\0' '\n' | head -n 3)
    mapfile -t hcargs <<<"$hc"
    "${run[@]}" "${hcargs[@]}" || fail "the image's HEALTHCHECK command failed"
    pass "/health answers, and the image's HEALTHCHECK passes"

    # The empty input's digest is BLAKE3's published test vector: b3sum is BLAKE3.
    [ "$(b3sum --no-names </dev/null)" = \
        af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262 ] \
        || fail "b3sum does not give BLAKE3's empty-input vector"
    local size f requests=0
    for size in 0 1 1024 1025 65537 3145735; do # the last one is spilled to a temp file
        f=$WORK/body-$size
        head -c "$size" /dev/urandom >"$f"
        code=$(curl -sS -o "$WORK/answer" -w '%{http_code}' --data-binary @"$f" "$url/blake3") \
            || fail "POST /blake3 ($size bytes)"
        [ "$code" = 200 ] || fail "/blake3 $size bytes: status $code: $(cat "$WORK/answer")"
        [ "$(cat "$WORK/answer")" = "$(b3sum --no-names "$f")" ] \
            || fail "/blake3 $size bytes: $(cat "$WORK/answer") != b3sum $(b3sum --no-names "$f")"
        [ "$(tail -c 1 "$WORK/answer" | od -An -c | tr -d ' ')" = '\n' ] || fail "no newline"
        code=$(curl -sS -o "$WORK/answer" -w '%{http_code}' --data-binary @"$f" "$url/echo") \
            || fail "POST /echo ($size bytes)"
        [ "$code" = 200 ] || fail "/echo $size bytes: status $code"
        cmp -s "$f" "$WORK/answer" || fail "/echo $size bytes: the body came back changed"
        requests=$((requests + 2))
    done
    pass "/blake3 equals b3sum and /echo returns the body (0 B to 3 MiB, CPU fallback)"

    # Access log on stdout: every op request was served by the CPU fallback.
    sleep 0.2
    [ "$(grep -cE '"POST /(blake3|echo) HTTP/1.1" 200 .* device=cpu ' "$WORK/stdout")" \
        -eq "$requests" ] || fail "access log on stdout lacks $requests device=cpu lines"
    pass "access log on stdout, device=cpu for all $requests op requests"

    # docker stop sends the STOPSIGNAL (SIGQUIT) to PID 1, the entrypoint, which hands it to
    # nginx: a graceful exit, status 0.
    kill -QUIT "$entrypoint"
    rc=0
    for i in $(seq 150); do kill -0 "$runner" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$runner" 2>/dev/null && fail "nginx did not exit within 15 s of SIGQUIT"
    wait "$runner" || rc=$?
    runner=""
    [ "$rc" = 0 ] || fail "nginx exited with status $rc after SIGQUIT"
    if grep -E '\[(alert|emerg|crit)\]|exited on signal|panicked' "$WORK/stderr"; then
        fail "the error log has failures"
    fi
    pass "SIGQUIT to the entrypoint stops nginx gracefully, status 0; nothing at crit or above in the log"

    echo "image test took $(($(date +%s) - ${T0:-$(date +%s)}))s"
    echo "image: $passed passed, 0 failed"
}

case "${1:-}" in
    check) check ;;
    "") main ;;
    *) echo "usage: $0" >&2; exit 2 ;;
esac
