#!/usr/bin/env bash
# On the GPU machine, from the repository root with .gpu/ carried (make gpu-bundle): nginx
# from the bundle with 4 workers on one GPU, twice. First with the MPS control daemon
# started the way the image starts it (docker/entrypoint.sh's own functions, sourced, as
# the workers' user with private directories): every worker's start line must say
# `MPS: on`, an MPS server must run as that user, and /echo must answer byte for byte.
# Then without MPS: every start line `MPS: off`, and the one warning that the workers share
# the GPU without MPS, said once. A 5 s wrk run of 1 KiB /echo at 64 connections each time
# shows what MPS is worth. Prints a short table; logs go to $OUT.
#
#   bash t/gpu/mps.sh        (as root the workers and the daemon run as nobody, as the
#                             image runs them as nginx; as another user, as that user)
set -u
cd "$(dirname "$0")/../.." || exit 1
. t/gpu/checks.sh
use_bundle /tmp/gpu-mps-out
WORKERS=4

# The image's MPS start and stop, not a copy of them.
NGX_GPU_ENTRYPOINT_LIB=1 . docker/entrypoint.sh

W=$(mktemp -d /tmp/ngx-gpu-mps.XXXXXX)
chmod 755 "$W"
if [ "$(id -u)" = 0 ]; then user=nobody; group=$(id -gn nobody); else user=$(id -un); group=$(id -gn); fi
export NGX_GPU_MPS_DIR=$W/mps NGX_GPU_MPS_USER=$user NGX_GPU_MPS=on
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$W/body" "$W/cuda"
chmod 777 "$W/body" "$W/cuda"
write_conf "$WORKERS" "" "location = /echo { gpu_process echo; }"
export CUDA_CACHE_PATH=$W/cuda
head -c 1024 /dev/urandom >"$W/body-1k"

rows=()

finish() {
    stop_nginx
    ngx_mps_stop
    cp "$W"/error-*.log "$W"/wrk-*.log "$OUT/" 2>/dev/null
    echo
    printf '%-12s %-10s %-10s %-10s %-9s %-8s %s\n' run "MPS: on" "MPS: off" warning server echo "1 KiB /echo, 64 conns"
    for r in "${rows[@]}"; do echo "$r"; done
    echo
    echo "gpu-mps: $passed passed, $failed failed"
    rm -rf "$W"
    [ "$failed" = 0 ] && [ "$passed" -gt 0 ]
    exit
}
trap finish INT TERM

nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv,noheader 2>&1 | head -n 2

# run NAME: starts nginx with whatever MPS environment is set, checks its start lines.
run() {
    local name=$1 log=$W/error-$1.log on off warn server=- echo_ok=no rps=-
    : >"$W/error.log"
    "$G/bin/nginx" -p "$W/" -c "$W/nginx.conf" 2>>"$W/error.log" &
    master=$!
    for _ in $(seq 600); do
        [ "$(grep -c 'gpu: using \|gpu: no usable GPU' "$W/error.log")" -ge "$WORKERS" ] && break
        kill -0 "$master" 2>/dev/null || break
        sleep 0.1
    done
    sleep 0.5 # the warning follows the start lines
    grep 'gpu: ' "$W/error.log" | sed 's/^.*\] [0-9#]*: //' | sort | uniq -c
    on=$(grep -c 'gpu: using gpu0 .*, MPS: on$' "$W/error.log")
    off=$(grep -c 'gpu: using gpu0 .*, MPS: off$' "$W/error.log")
    warn=$(grep -c 'workers share gpu0 without MPS' "$W/error.log")
    if pgrep -u "$user" -x nvidia-cuda-mps-server >/dev/null 2>&1 \
        || pgrep -u "$user" -f nvidia-cuda-mps-server >/dev/null 2>&1; then server=$user; fi
    if curl -sS --data-binary @"$W/body-1k" "http://127.0.0.1:$PORT/echo" -o "$W/answer" \
        && cmp -s "$W/body-1k" "$W/answer"; then echo_ok=yes; fi
    if [ -x "$G/bin/wrk" ]; then
        "$G/bin/wrk" -t4 -c64 -d5s -s bench/post.lua "http://127.0.0.1:$PORT/echo" -- "$W/body-1k" \
            >"$W/wrk-$name.log" 2>&1
        rps=$(awk '/Requests\/sec/ { printf "%.0f req/s", $2 }' "$W/wrk-$name.log")
        rps="$rps, $(grep -c '^  Non-2xx' "$W/wrk-$name.log" | sed 's/^0$/all 200/; s/^[1-9].*/non-2xx!/')"
    fi
    stop_nginx
    cp "$W/error.log" "$log"
    rows+=("$(printf '%-12s %-10s %-10s %-10s %-9s %-8s %s' "$name" "$on/$WORKERS" "$off/$WORKERS" "$warn" "$server" "$echo_ok" "$rps")")
    RUN_ON=$on RUN_OFF=$off RUN_WARN=$warn RUN_SERVER=$server RUN_ECHO=$echo_ok
}

# 1. With MPS, started as the image starts it.
if ngx_mps_start; then
    pass "MPS control daemon started by the entrypoint's function, as $user"
    run with-mps
    [ "$RUN_ON" = "$WORKERS" ] && pass "all $WORKERS workers: MPS: on" \
        || bad "with MPS: $RUN_ON of $WORKERS start lines say MPS: on ($RUN_OFF say off)"
    [ "$RUN_WARN" = 0 ] && pass "no sharing warning with MPS" || bad "the sharing warning with MPS on"
    [ "$RUN_SERVER" = "$user" ] && pass "an MPS server runs as $user" || bad "no MPS server running as $user"
    [ "$RUN_ECHO" = yes ] && pass "/echo through MPS returns the body" || bad "/echo with MPS"
    ngx_mps_stop
    sleep 1
    pgrep -f nvidia-cuda-mps-control >/dev/null 2>&1 && bad "the control daemon still runs after quit" \
        || pass "the control daemon is gone after quit"
else
    bad "the MPS control daemon did not start"
fi

# 2. Without MPS: no daemon. The pipe directory handed to nginx is an empty one, so that a
#    system-wide daemon on the default /tmp/nvidia-mps (if the machine runs one) is not
#    found either.
mkdir -p "$W/no-mps"
chmod 777 "$W/no-mps"
export CUDA_MPS_PIPE_DIRECTORY=$W/no-mps CUDA_MPS_LOG_DIRECTORY=$W/no-mps
run without-mps
[ "$RUN_OFF" = "$WORKERS" ] && pass "all $WORKERS workers: MPS: off" \
    || bad "without MPS: $RUN_OFF of $WORKERS start lines say MPS: off ($RUN_ON say on)"
[ "$RUN_WARN" = 1 ] && pass "the sharing warning, once: $(grep -o 'gpu: [0-9]* workers share gpu0 without MPS' "$W/error-without-mps.log" | head -n1)" \
    || bad "the sharing warning $RUN_WARN times, not once"
[ "$RUN_ECHO" = yes ] && pass "/echo without MPS returns the body" || bad "/echo without MPS"
finish
