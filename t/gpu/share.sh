#!/usr/bin/env bash
# On the GPU machine, from the repository root with .gpu/ carried (make gpu-bundle): one
# copy of a knn index per GPU whatever the number of workers (src/gpu/shared.rs).
# 1. A 1 GiB index (2M x 128 float32, random), nginx with 1, 2, 4 and 8 workers, without
#    and with the MPS daemon: GPU memory used (nvidia-smi, whole device, minus what was used
#    before nginx started) once every worker has loaded. Fails where memory grows per
#    worker by more than one worker's context + scratch (measured: the 1-worker figure
#    minus the index), i.e. where an index is copied per worker.
# 2. Under load (wrk, 4 workers, single-query KServe requests): SIGKILL of a worker, then
#    `nginx -s reload`. Fails on any non-2xx answer, or when the respawned worker does not
#    import the index from a live holder, or the reload's workers hold more than one copy
#    (they import from the old generation, or, where it has exited first, one uploads).
# Prints the tables last; the logs go to one file, $OUT/share-logs.txt.
#
#   bash t/gpu/share.sh        (as root the workers run as nobody, as the image runs them)
set -u
cd "$(dirname "$0")/../.." || exit 1
. t/gpu/checks.sh
use_bundle /tmp/gpu-share-out
ROWS=${NGX_GPU_SHARE_ROWS:-2097152}
DIM=128
COUNTS=${NGX_GPU_SHARE_WORKERS:-"1 2 4 8"}
# Which MPS modes get the run under load (both by default; "off" for a short run).
LOAD_MODES=${NGX_GPU_SHARE_LOAD:-"off on"}

NGX_GPU_ENTRYPOINT_LIB=1 . docker/entrypoint.sh

W=$(mktemp -d /tmp/ngx-gpu-share-test.XXXXXX)
chmod 755 "$W"
if [ "$(id -u)" = 0 ]; then user=nobody; group=$(id -gn nobody); else user=$(id -un); group=$(id -gn); fi
export NGX_GPU_MPS_DIR=$W/mps NGX_GPU_MPS_USER=$user NGX_GPU_MPS=on
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
L=$W/logs
mkdir -p "$W/body" "$W/cuda" "$W/no-mps" "$L"
chmod 777 "$W/body" "$W/cuda" "$W/no-mps"
export CUDA_CACHE_PATH=$W/cuda

mem_rows=()
load_rows=()

python3 - "$W/index.npy" "$W/query.json" "$ROWS" "$DIM" <<'EOF'
import json, sys
import numpy as np
path, query, n, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng()
x = rng.standard_normal((n, d), dtype=np.float32)
np.save(path, x)
q = rng.standard_normal(d).astype(np.float32)
json.dump({"inputs": [{"name": "QUERY", "datatype": "FP32", "shape": [1, d],
                       "data": [float(v) for v in q]}],
           "parameters": {"k": 10}}, open(query, "w"))
EOF
INDEX_MIB=$(( $(stat -c %s "$W/index.npy") / 1048576 ))
echo "index: $ROWS x $DIM float32, $INDEX_MIB MiB"

conf() {
    write_conf "$1" "gpu_model vec knn $W/index.npy k=10;" \
        "location /v2 { gpu_process kserve; gpu_batch_size 64; }"
}

used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n1 | tr -d ' '; }
loaded() { grep -c 'gpu: knn "vec": index ' "$W/error.log"; }

start_nginx() {
    : >"$W/error.log"
    "$G/bin/nginx" -p "$W/" -c "$W/nginx.conf" 2>>"$W/error.log" &
    master=$!
}
# wait_loaded N: until N lines say how the index was loaded (60 s at most).
wait_loaded() {
    for _ in $(seq 600); do
        [ "$(loaded)" -ge "$1" ] && return 0
        kill -0 "$master" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
finish() {
    stop_nginx 30
    ngx_mps_stop
    echo
    echo "GPU memory used by nginx (MiB, whole device less the idle figure), $INDEX_MIB MiB index:"
    printf '%-8s %-8s %-10s %-10s %-9s %-9s %s\n' mps workers used per-worker shared own "limit (index + n x (ctx+scratch))"
    for r in "${mem_rows[@]}"; do echo "$r"; done
    echo
    echo "Under load (wrk, 4 workers; SIGKILL of one worker at 4 s, nginx -s reload at 9 s):"
    printf '%-8s %-10s %-8s %-14s %-9s %-9s %s\n' mps requests non-2xx socket-errors respawn reload "used after (MiB)"
    for r in "${load_rows[@]}"; do echo "$r"; done
    echo
    echo "gpu-share: $passed passed, $failed failed"
    for f in "$L"/*; do [ -f "$f" ] && { echo "######## $(basename "$f")"; cat "$f"; }; done >"$OUT/share-logs.txt"
    rm -rf "$W"
    [ "$failed" = 0 ] && [ "$passed" -gt 0 ]
    exit
}
trap finish INT TERM

# memory MODE: nginx with each worker count; memory once every worker has loaded.
memory() {
    local mode=$1 idle one=
    idle=$(used_mib)
    for n in $COUNTS; do
        conf "$n"
        start_nginx
        if ! wait_loaded "$n"; then
            bad "$mode, $n workers: $(loaded) of $n workers loaded the index"
            stop_nginx 30
            continue
        fi
        sleep 1
        local used=$(( $(used_mib) - idle ))
        local shared own
        shared=$(grep -c 'index shared on gpu' "$W/error.log")
        own=$(grep -c 'index not shared' "$W/error.log")
        grep 'gpu: knn\|gpu: using' "$W/error.log" | sed 's/^.*\] [0-9#]*: //' | sort | uniq -c
        [ "$n" = 4 ] && nvidia-smi --query-compute-apps=pid,used_memory --format=csv >"$L/apps-$mode-4.csv" 2>&1
        cp "$W/error.log" "$L/error-$mode-$n.log"
        stop_nginx 30
        [ -z "$one" ] && one=$used
        # One worker's context + scratch: its figure less the index (at least 64 MiB).
        local ctx=$(( one - INDEX_MIB )); [ "$ctx" -lt 64 ] && ctx=64
        local limit=$(( INDEX_MIB + n * ctx * 115 / 100 + 128 ))
        mem_rows+=("$(printf '%-8s %-8s %-10s %-10s %-9s %-9s %s' "$mode" "$n" "$used" "$(( used / n ))" "$shared" "$own" "$limit")")
        if [ "$used" -le "$limit" ]; then
            pass "$mode, $n workers: $used MiB <= $limit MiB"
        else
            bad "$mode, $n workers: $used MiB > $limit MiB (index copied per worker?)"
        fi
        [ "$own" = 0 ] || echo "note: $own workers loaded a copy of their own: $(grep -m1 -o 'index not shared.*' "$L/error-$mode-$n.log")"
    done
}

# under_load MODE: 4 workers, wrk; SIGKILL one worker, then reload.
under_load() {
    local mode=$1 idle
    idle=$(used_mib)
    conf 4
    start_nginx
    wait_loaded 4 || { bad "$mode: the 4 workers did not load the index"; stop_nginx 30; return; }
    local code
    code=$(curl -sS -o "$L/answer-$mode.json" -w '%{http_code}' --data-binary @"$W/query.json" \
        "http://127.0.0.1:$PORT/v2/models/vec/infer")
    [ "$code" = 200 ] && pass "$mode: a search answers 200: $(head -c 160 "$L/answer-$mode.json")" \
        || bad "$mode: a search answers $code: $(head -c 300 "$L/answer-$mode.json")"
    "$G/bin/wrk" -t2 -c32 -d16s --timeout 10s -s bench/post.lua "http://127.0.0.1:$PORT/v2/models/vec/infer" -- "$W/query.json" \
        >"$L/wrk-$mode.log" 2>&1 &
    local wrk=$!
    sleep 4
    local victim
    victim=$(pgrep -P "$master" | head -n1)
    kill -KILL "$victim"
    echo "$mode: killed worker $victim"
    wait_loaded 5 || bad "$mode: no worker loaded the index after the kill"
    sleep 4
    "$G/bin/nginx" -p "$W/" -c "$W/nginx.conf" -s reload
    wait_loaded 9 || bad "$mode: the reload's 4 workers did not all load the index"
    wait "$wrk"
    local after=$(( $(used_mib) - idle ))
    cp "$W/error.log" "$L/error-load-$mode.log"
    local log=$L/wrk-$mode.log
    local requests non2xx sockerr respawn reload reload_up
    requests=$(awk '/requests in/ { print $1 }' "$log")
    non2xx=$(awk '/Non-2xx/ { print $NF }' "$log"); non2xx=${non2xx:-0}
    # "  Socket errors: connect 0, read 1, write 0, timeout 15" (the leading blanks make $1 empty)
    sockerr=$(awk -F'[ ,]+' '/Socket errors/ { print $5+$7+$9+$11 }' "$log"); sockerr=${sockerr:-0}
    # Load lines after the first 4: the respawned worker's (5th), the reload's (6th-9th).
    respawn=$(grep 'gpu: knn "vec": index ' "$W/error.log" | sed -n 5p | grep -c 'imported')
    reload=$(grep 'gpu: knn "vec": index ' "$W/error.log" | sed -n '6,9p' | grep -c 'imported')
    # Under keepalive load the old generation closes its idle connections and exits within
    # a second of the reload, before the new workers have opened the device: then one of
    # them uploads the index and the other three import it (still one copy).
    reload_up=$(grep 'gpu: knn "vec": index ' "$W/error.log" | sed -n '6,9p' | grep -c 'uploaded by this worker')
    load_rows+=("$(printf '%-8s %-10s %-8s %-14s %-9s %-9s %s' "$mode" "${requests:-?}" "$non2xx" "$sockerr" "$respawn/1" "$reload/4" "$after")")
    grep 'Socket errors\|Non-2xx\|Requests/sec\|requests in' "$log"
    stop_nginx 30
    [ -n "$requests" ] && [ "$requests" -gt 0 ] && [ "$non2xx" = 0 ] \
        && pass "$mode: ${requests} requests under a worker's SIGKILL and a reload, none non-2xx" \
        || bad "$mode: ${requests:-no} requests, $non2xx non-2xx"
    [ "$respawn" = 1 ] && pass "$mode: the respawned worker imported the index" \
        || bad "$mode: the respawned worker did not import the index"
    if [ "$reload" = 4 ]; then
        pass "$mode: the reload's 4 workers imported the index from the old generation"
    elif [ "$reload" = 3 ] && [ "$reload_up" = 1 ]; then
        pass "$mode: the reload's 4 workers share one copy (the old generation had exited: one uploaded, 3 imported)"
    else
        bad "$mode: the reload's workers: $reload imported, $reload_up uploaded (one copy wanted)"
    fi
    [ "$sockerr" = 0 ] || echo "note: $mode: $sockerr socket errors (wrk: a killed worker's connections read-fail; timeouts are answers slower than wrk's --timeout)"
}

nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader

# Without MPS: an empty pipe directory, so that no system-wide daemon is found either.
export CUDA_MPS_PIPE_DIRECTORY=$W/no-mps CUDA_MPS_LOG_DIRECTORY=$W/no-mps
memory off
case " $LOAD_MODES " in *" off "*) under_load off ;; esac
unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
if ngx_mps_start; then
    memory on
    case " $LOAD_MODES " in *" on "*) under_load on ;; esac
    ngx_mps_stop
else
    bad "the MPS control daemon did not start: ${ngx_mps_why:-}"
fi
finish
