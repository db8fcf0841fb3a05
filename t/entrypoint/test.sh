#!/usr/bin/env bash
# The image's entrypoint (docker/entrypoint.sh) outside the image, in seconds: the nginx and
# module built here with the image's own config (ports and paths moved under a temp
# prefix), the entrypoint run by /bin/sh, and a stand-in MPS control program
# (t/entrypoint/fake-mps/) where the real one needs a GPU. Checks: the one line without MPS,
# NGX_GPU_MPS=on failing clearly, the daemon started as the workers' user with directories
# only that user can enter, the workers given both CUDA_MPS_* variables, graceful stop on
# SIGQUIT and SIGTERM, reload on SIGHUP, the daemon stopped after nginx, and nginx's exit
# status passed on. As root the workers and the daemon run as nobody; as another user, as
# that user. Part of make check (after cargo build --release).
set -uo pipefail
# Job control: without it bash starts background commands with SIGINT and SIGQUIT ignored,
# and a shell cannot trap what it was started ignoring (a container's PID 1 starts with
# neither ignored).
set -m
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
NGINX=${NGX_GPU_NGINX:-$(ls -d "$ROOT"/target/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n1)}
MODULE=${NGX_GPU_MODULE:-$ROOT/target/release/libngx_http_gpu_module.so}
[ -x "$NGINX" ] && [ -f "$MODULE" ] || { echo "build first: cargo build --release"; exit 1; }

W=$(mktemp -d /tmp/ngx-entrypoint.XXXXXX)
chmod 755 "$W"
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; [ -f "$W/err" ] && sed 's/^/   | /' "$W/err" | tail -n 15; }
runner=

cleanup() {
    [ -n "$runner" ] && kill -TERM "$runner" 2>/dev/null
    [ -f "$W/prefix/nginx.pid" ] && kill -TERM "$(cat "$W/prefix/nginx.pid")" 2>/dev/null
    sleep 0.2
    rm -rf "$W"
}
trap cleanup EXIT

if [ "$(id -u)" = 0 ]; then
    user=nobody
    group=$(id -gn nobody)
else
    user=$(id -un)
    group=$(id -gn)
fi

# The image's config, with what differs outside a container moved (every substitution must
# hit, so that a changed config fails here instead of running half-adapted).
P=$W/prefix
mkdir -p "$P/conf" "$P/modules" "$P/body"
chmod 777 "$P/body"
ln -s "$MODULE" "$P/modules/ngx_http_gpu_module.so"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
conf=$(cat docker/conf/nginx.conf)
sub() {
    grep -qF "$1" <<<"$conf" || { echo "docker/conf/nginx.conf has no '$1'"; exit 1; }
    conf=${conf//"$1"/"$2"}
}
sub "listen 8080;" "listen 127.0.0.1:$PORT;"
sub "pid /run/nginx.pid;" "pid $P/nginx.pid;"
sub "client_body_temp_path /var/cache/nginx/client_body;" "client_body_temp_path $P/body;"
sub "user nginx nginx;" "user $user $group;"
sub "access_log /dev/stdout gpu;" "access_log off;"
printf '%s\n' "$conf" >"$P/conf/nginx.conf"

# The stand-in runs as the daemon's user (nobody, as root): a copy in the work directory,
# since the checkout may be in a directory only its owner can enter (mktemp -d).
FAKE=$W/fake-mps
mkdir -p "$FAKE"
cp "$ROOT/t/entrypoint/fake-mps/nvidia-cuda-mps-control" "$FAKE/"
chmod 755 "$FAKE" "$FAKE/nvidia-cuda-mps-control"
# nginx's master and workers overwrite /proc/PID/environ with their process titles: a
# wrapper named nginx records the environment the entrypoint hands nginx, then is nginx.
mkdir -p "$W/bin"
printf '#!/bin/sh\nenv >"%s"\nexec "%s" "$@"\n' "$W/nginx-env" "$NGINX" >"$W/bin/nginx"
chmod +x "$W/bin/nginx"
MPSDIR=$W/mps
ENTRY=("$ROOT/docker/entrypoint.sh")

# Runs the entrypoint with nginx serving, in the background (stderr in $W/err); waits for
# the workers. Extra environment as arguments (VAR=value ...). Every signal starts at its
# default, as for a container's PID 1: a shell cannot trap a signal it was started
# ignoring, and this test may itself run under nohup (SIGHUP ignored) or without job
# control (background jobs get SIGINT and SIGQUIT ignored).
start() {
    rm -f "$P/nginx.pid"
    env --default-signal -u CUDA_MPS_PIPE_DIRECTORY -u CUDA_MPS_LOG_DIRECTORY NGX_GPU_MPS_DIR="$MPSDIR" \
        NGX_GPU_MPS_USER="$user" "$@" \
        sh "${ENTRY[@]}" "$W/bin/nginx" -p "$P/" -c conf/nginx.conf >/dev/null 2>"$W/err" &
    runner=$!
    for _ in $(seq 100); do
        [ -f "$P/nginx.pid" ] && [ "$(grep -c 'gpu: ' "$W/err")" -ge 2 ] && return 0
        kill -0 "$runner" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Waits for the entrypoint to exit (15 s at most); its status in $rc.
finish() {
    rc=
    for _ in $(seq 150); do kill -0 "$runner" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$runner" 2>/dev/null; then rc=timeout; kill -KILL "$runner"; fi
    [ "$rc" = timeout ] || { wait "$runner"; rc=$?; }
    runner=
}

workers() { pgrep -P "$(cat "$P/nginx.pid")" -f 'nginx: worker process' | sort; }
answers() { [ "$(curl -sS "http://127.0.0.1:$PORT/health" 2>/dev/null)" = ok ]; }
lines() { grep -c 'ngx-gpu-entrypoint: ' "$W/err"; }

# 1. No MPS program: one line, nginx serves, SIGQUIT is a graceful stop with status 0.
if start PATH=/usr/bin:/bin NGX_GPU_MPS_DEVICE=/dev/null && answers; then
    why=$(grep 'ngx-gpu-entrypoint: MPS: not started: ' "$W/err")
    [ -n "$why" ] && [ "$(lines)" = 1 ] && grep -q 'no nvidia-cuda-mps-control on PATH' <<<"$why" \
        && pass "no MPS program: says so ($(sed 's/.*MPS: //' <<<"$why" | cut -c1-60)...) and serves" \
        || bad "no MPS program: no line saying why"
    pids=$(workers)
    [ -n "$pids" ] && ! grep -q CUDA_MPS "$W/nginx-env" \
        && pass "without MPS nginx gets no CUDA_MPS_* variables" \
        || bad "without MPS a worker has CUDA_MPS_PIPE_DIRECTORY, or no workers"
    kill -QUIT "$runner"; finish
    [ "$rc" = 0 ] && pass "SIGQUIT: graceful stop, status 0" || bad "SIGQUIT: status $rc"
else
    bad "nginx did not start without MPS"; finish
fi

# 2. No GPU (the program is there, the device node is not): the same, with the reason.
if start PATH="$FAKE:/usr/bin:/bin" NGX_GPU_MPS_DEVICE=/nonexistent/nvidiactl && answers; then
    grep -q 'MPS: not started: no GPU in this container (no /nonexistent/nvidiactl); going on without it' "$W/err" && [ "$(lines)" = 1 ] \
        && [ ! -e "$MPSDIR/pipe" ] \
        && pass "no GPU: says so, starts no daemon" || bad "no GPU: $(cat "$W/err" | grep entrypoint)"
    kill -TERM "$runner"; finish
    [ "$rc" = 0 ] && pass "SIGTERM: graceful stop (forwarded as SIGQUIT), status 0" \
        || bad "SIGTERM: status $rc"
else
    bad "nginx did not start without a GPU"; finish
fi

# 3. NGX_GPU_MPS=on without MPS: fatal, clearly, before nginx starts.
for case in "PATH=/usr/bin:/bin NGX_GPU_MPS_DEVICE=/dev/null" \
    "PATH=$FAKE:/usr/bin:/bin NGX_GPU_MPS_DEVICE=/dev/null FAKE_MPS_FAIL=start"; do
    # shellcheck disable=SC2086 # assignments, one per word
    env -u CUDA_MPS_PIPE_DIRECTORY NGX_GPU_MPS=on NGX_GPU_MPS_DIR="$MPSDIR" NGX_GPU_MPS_USER="$user" \
        $case sh "${ENTRY[@]}" "$NGINX" -p "$P/" -c conf/nginx.conf >/dev/null 2>"$W/err"
    rc=$?
    [ "$rc" = 1 ] && grep -q 'NGX_GPU_MPS=on: not starting nginx' "$W/err" && [ "$(lines)" = 1 ] \
        && ! grep -q 'gpu: ' "$W/err" && [ ! -f "$P/nginx.pid" ] \
        && pass "NGX_GPU_MPS=on, $(sed 's/.*not started: //' <<<"$(grep 'not started' "$W/err")" | cut -c1-40)...: status 1, nginx not started" \
        || bad "NGX_GPU_MPS=on ($case): status $rc"
done
env NGX_GPU_MPS=maybe sh "${ENTRY[@]}" "$NGINX" -p "$P/" -c conf/nginx.conf >/dev/null 2>"$W/err"
rc=$?
[ "$rc" = 1 ] && grep -q "NGX_GPU_MPS must be on, off or auto, not 'maybe'" "$W/err" \
    && pass "NGX_GPU_MPS=maybe: refused" || bad "NGX_GPU_MPS=maybe: status $rc"

# 4. With MPS (the stand-in): daemon as the workers' user, private directories, the workers
#    get both variables, SIGHUP reloads, the daemon is stopped after nginx.
if start PATH="$FAKE:/usr/bin:/bin" NGX_GPU_MPS=on NGX_GPU_MPS_DEVICE=/dev/null && answers; then
    grep -q "MPS: control daemon started as '$user'" "$W/err" \
        && [ "$(cat "$MPSDIR/pipe/daemon-user")" = "$user" ] \
        && pass "daemon started as the workers' user ($user)" || bad "daemon user"
    modes=$(stat -c '%U %a' "$MPSDIR/pipe" "$MPSDIR/log" | sort -u)
    [ "$modes" = "$user 700" ] && pass "pipe and log directories: $user, mode 700" \
        || bad "directories: $modes"
    ok=1
    pids=$(workers)
    [ "$(wc -l <<<"$pids")" = 2 ] || ok=0
    for w in $pids; do [ "$(stat -c %U "/proc/$w")" = "$user" ] || ok=0; done
    grep -qx "CUDA_MPS_PIPE_DIRECTORY=$MPSDIR/pipe" "$W/nginx-env" || ok=0
    grep -qx "CUDA_MPS_LOG_DIRECTORY=$MPSDIR/log" "$W/nginx-env" || ok=0
    grep -qx 'env CUDA_MPS_PIPE_DIRECTORY;' "$P/conf/nginx.conf" || ok=0
    grep -qx 'env CUDA_MPS_LOG_DIRECTORY;' "$P/conf/nginx.conf" || ok=0
    [ $ok = 1 ] && pass "nginx started with both CUDA_MPS_* variables, kept for the workers by env; workers as $user" \
        || bad "workers' user ($pids), nginx's environment or the config's env lines"
    kill -HUP "$runner"
    for _ in $(seq 50); do
        now=$(workers)
        [ -n "$now" ] && [ -z "$(comm -12 <(echo "$pids") <(echo "$now"))" ] && break
        sleep 0.1
    done
    [ -z "$(comm -12 <(echo "$pids") <(echo "$now"))" ] && kill -0 "$runner" && answers \
        && pass "SIGHUP: reload (new workers), still serving" || bad "SIGHUP did not reload"
    kill -QUIT "$runner"; finish
    [ "$rc" = 0 ] && grep -q 'MPS: control daemon stopped' "$W/err" \
        && [ "$(cat "$MPSDIR/pipe/control-log")" = "quit by $user" ] \
        && pass "SIGQUIT: nginx stopped, then the daemon (quit by $user), status 0" \
        || bad "stop with MPS: status $rc"
else
    bad "nginx did not start with the stand-in MPS"; finish
fi

# 5. A daemon that never answers: auto goes on without MPS and says so; the workers get no
#    pipe directory.
if start PATH="$FAKE:/usr/bin:/bin" NGX_GPU_MPS_DEVICE=/dev/null FAKE_MPS_FAIL=answer && answers; then
    grep -q 'MPS: not started: the daemon does not answer' "$W/err" \
        && grep -q 'going on without it' "$W/err" \
        && ! grep -q CUDA_MPS "$W/nginx-env" \
        && pass "a daemon that does not answer: auto goes on without MPS" \
        || bad "mute daemon"
    touch "$MPSDIR/pipe/quit" # let the stand-in go
    kill -INT "$runner"; finish
    [ "$rc" = 0 ] && pass "SIGINT: fast stop (SIGTERM to nginx), status 0" || bad "SIGINT: status $rc"
else
    bad "nginx did not start with a mute daemon"; finish
fi

# 6. NGX_GPU_MPS=off: one line, nothing started.
rm -rf "$MPSDIR"
if start PATH="$FAKE:/usr/bin:/bin" NGX_GPU_MPS=off NGX_GPU_MPS_DEVICE=/dev/null && answers; then
    [ "$(lines)" = 1 ] && grep -q 'MPS: off (NGX_GPU_MPS=off)' "$W/err" && [ ! -e "$MPSDIR" ] \
        && pass "NGX_GPU_MPS=off: one line, no daemon" || bad "NGX_GPU_MPS=off"
    kill -QUIT "$runner"; finish
else
    bad "nginx did not start with NGX_GPU_MPS=off"; finish
fi

# 7. nginx's own status is passed on: a config that fails at start gives nginx's 1, and the
#    daemon is stopped all the same. Commands that do not serve are exec'd unchanged.
echo "events {} http { server { listen 127.0.0.1:$PORT; location / { no_such_directive; } } }" \
    >"$P/conf/broken.conf"
env NGX_GPU_MPS_DIR="$MPSDIR" NGX_GPU_MPS_USER="$user" PATH="$FAKE:/usr/bin:/bin" \
    NGX_GPU_MPS_DEVICE=/dev/null sh "${ENTRY[@]}" "$NGINX" -p "$P/" -c conf/broken.conf \
    -g 'daemon off;' >/dev/null 2>"$W/err"
rc=$?
[ "$rc" = 1 ] && grep -q 'unknown directive "no_such_directive"' "$W/err" \
    && grep -q 'MPS: control daemon stopped' "$W/err" \
    && pass "nginx failing at start: its status 1 passed on, the daemon stopped" \
    || bad "broken config: status $rc"
out=$(PATH="$FAKE:/usr/bin:/bin" NGX_GPU_MPS_DEVICE=/dev/null sh "${ENTRY[@]}" "$NGINX" -V 2>&1)
rc=$?
[ "$rc" = 0 ] && grep -q 'nginx version' <<<"$out" && ! grep -q entrypoint <<<"$out" \
    && pass "nginx -V is run as it is (no MPS)" || bad "nginx -V: $rc $out"
sh "${ENTRY[@]}" sh -c 'exit 7'
rc=$?
[ "$rc" = 7 ] && pass "another command is exec'd, its status passed on" || bad "sh -c 'exit 7': $rc"

# 8. The systemd unit for nginx outside the image: loads (systemd-analyze verify, the MPS
#    program's path swapped for one that exists here), and it, its nginx drop-in and the
#    entrypoint name the same two directories.
S=docker/systemd
if command -v systemd-analyze >/dev/null 2>&1; then
    sed 's|/usr/bin/nvidia-cuda-mps-control|/bin/true|g' "$S/ngx-gpu-mps.service" >"$W/ngx-gpu-mps.service"
    systemd-analyze verify "$W/ngx-gpu-mps.service" >"$W/err" 2>&1 && [ ! -s "$W/err" ] \
        && pass "systemd-analyze verify ngx-gpu-mps.service: clean" || bad "systemd-analyze verify: $(cat "$W/err")"
else
    echo "skipped: systemd-analyze verify (no systemd-analyze)"
fi
ok=1
for f in "$S/ngx-gpu-mps.service" "$S/nginx.service.d/ngx-gpu-mps.conf"; do
    grep -qx 'Environment=CUDA_MPS_PIPE_DIRECTORY=/run/ngx-gpu/mps/pipe' "$f" || ok=0
    grep -qx 'Environment=CUDA_MPS_LOG_DIRECTORY=/run/ngx-gpu/mps/log' "$f" || ok=0
done
grep -qx 'RuntimeDirectory=ngx-gpu/mps/pipe ngx-gpu/mps/log' "$S/ngx-gpu-mps.service" || ok=0
grep -q 'NGX_GPU_MPS_DIR=${NGX_GPU_MPS_DIR:-/run/ngx-gpu/mps}' docker/entrypoint.sh || ok=0
[ $ok = 1 ] && pass "unit, drop-in and entrypoint: the same /run/ngx-gpu/mps/{pipe,log}" \
    || bad "the unit, the drop-in and the entrypoint disagree on the MPS directories"

echo "entrypoint: $passed passed, $failed failed"
[ "$failed" = 0 ]
