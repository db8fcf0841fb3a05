#!/usr/bin/env bash
# Soak on the GPU machine (repository root, .gpu/ carried): nginx with 4 workers on the GPU
# under load at half of its measured peak for SOAK_SECS (600), with every answer of a
# checking client compared; each worker's RSS and GPU memory sampled every 30 s. Passes
# when, from the first sample after a minute to the end, both stay within 5%.
#
# One device call is limited to 10 minutes, so the soak runs detached:
#   bash t/gpu/soak.sh start     starts it (setsid) and returns
#   bash t/gpu/soak.sh wait      waits for it to end, prints the table and the verdict
#   bash t/gpu/soak.sh run       runs it in the foreground (SOAK_SECS=60 for a short one)
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
G=$ROOT/.gpu
W=/tmp/ngx-soak
OUT=${OUT:-/tmp/gpu-out}
SOAK_SECS=${SOAK_SECS:-600}
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$G/lib"

run() {
    rm -rf "$W"; mkdir -p "$W"/{conf,logs,modules}
    cp "$G/ngx_http_gpu_module.so" "$W/modules/"
    cat >"$W/conf/nginx.conf" <<'EOF'
load_module modules/ngx_http_gpu_module.so;
worker_processes 4;
error_log logs/error.log notice;
pid logs/nginx.pid;
env CUDA_VISIBLE_DEVICES;
events { worker_connections 8192; }
http {
    access_log off;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    server {
        listen 127.0.0.1:8090 backlog=4096;
        location = /echo { gpu_process echo; }
        location = /blake3 { gpu_process blake3; }
    }
}
EOF
    "$G/bin/nginx" -p "$W" -c conf/nginx.conf || { echo "nginx did not start"; exit 1; }
    sleep 2
    grep "gpu: using" "$W/logs/error.log" | head -n 4
    head -c 1024 /dev/urandom >"$W/body-1k"
    head -c 262144 /dev/urandom >"$W/body-256k"
    # Peak of 1 KiB echo, then half of it: paced connections (each waits 1 ms per request).
    peak=$("$G/bin/wrk" -t4 -c64 -d10s -s "$ROOT/bench/post.lua" http://127.0.0.1:8090/echo \
        -- "$W/body-1k" 0 2>&1 | awk '/Requests\/sec/ {print $2}')
    conns=$(python3 -c "print(max(8, min(2000, round(float('${peak:-0}') / 2 * 0.0015))))")
    echo "peak 1 KiB echo: $peak req/s; half load: $conns paced connections, plus 256 KiB blake3"
    "$G/bin/wrk" -t4 -c"$conns" -d"${SOAK_SECS}s" --latency -s "$ROOT/bench/post.lua" \
        http://127.0.0.1:8090/echo -- "$W/body-1k" 1 >"$W/wrk-echo.log" 2>&1 &
    "$G/bin/wrk" -t2 -c8 -d"${SOAK_SECS}s" -s "$ROOT/bench/post.lua" \
        http://127.0.0.1:8090/blake3 -- "$W/body-256k" 1 >"$W/wrk-blake3.log" 2>&1 &
    # A checking client: random bodies of random sizes through echo, compared byte for byte.
    (
        end=$((SECONDS + SOAK_SECS)); ok=0; bad=0
        while [ $SECONDS -lt $end ]; do
            head -c $((RANDOM * 64 + RANDOM % 7)) /dev/urandom >"$W/check-in"
            if curl -sS -m 30 --data-binary @"$W/check-in" -o "$W/check-out" http://127.0.0.1:8090/echo \
                && cmp -s "$W/check-in" "$W/check-out"; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
            sleep 0.2
        done
        echo "checked $ok bad $bad" >"$W/check.result"
    ) &
    : >"$W/samples"
    start=$SECONDS
    while [ $((SECONDS - start)) -le "$SOAK_SECS" ]; do
        t=$((SECONDS - start))
        gpu=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null)
        for pid in $(pgrep -f "nginx: worker process" ); do
            rss=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status 2>/dev/null)
            mem=$(echo "$gpu" | awk -F', ' -v p="$pid" '$1 == p {print $2}')
            echo "$t $pid ${rss:-0} ${mem:-0}" >>"$W/samples"
        done
        sleep 30
    done
    wait
    "$G/bin/nginx" -p "$W" -s quit; sleep 3
    python3 - "$W/samples" "$SOAK_SECS" <<'EOF' | tee "$W/result"
import sys
samples, secs = sys.argv[1], int(sys.argv[2])
rows = [tuple(map(int, l.split())) for l in open(samples) if l.strip()]
pids = sorted({r[1] for r in rows})
print(f"| worker | RSS at 1 min (KiB) | RSS at end | change | GPU MiB at 1 min | GPU MiB at end | change |")
print("|---|---|---|---|---|---|---|")
flat = True
for p in pids:
    mine = [r for r in rows if r[1] == p and r[0] >= 60]
    if len(mine) < 2:
        continue
    a, b = mine[0], mine[-1]
    d_rss = (b[2] - a[2]) / a[2] * 100
    d_gpu = (b[3] - a[3]) / a[3] * 100 if a[3] else float("nan")
    worst_rss = max(abs(r[2] - a[2]) / a[2] * 100 for r in mine)
    worst_gpu = max(abs(r[3] - a[3]) / a[3] * 100 for r in mine) if a[3] else 0.0
    flat &= worst_rss <= 5 and worst_gpu <= 5
    print(f"| {p} | {a[2]} | {b[2]} | {d_rss:+.1f}% (worst {worst_rss:.1f}%) | {a[3]} | {b[3]} | {d_gpu:+.1f}% (worst {worst_gpu:.1f}%) |")
print(f"soak {secs}s: {'FLAT within 5%' if flat else 'NOT FLAT'}")
EOF
    for f in "$W"/wrk-*.log; do echo "== $f"; grep -E "Requests/sec|requests in|Non-2xx|Socket|50.000%|99.000%" "$f"; done
    cat "$W/check.result"
    grep -E "\[(alert|emerg|crit)\]|exited on signal" "$W/logs/error.log" || echo "error log: nothing at crit or above"
    grep "gpu: .* batches" "$W/logs/error.log" | head -n 4
    touch "$W/done"
}

case "${1:-run}" in
    run) run ;;
    start)
        mkdir -p /tmp/ngx-soak-log
        setsid bash "$0" run >/tmp/ngx-soak-log/soak.log 2>&1 </dev/null &
        sleep 15
        cat /tmp/ngx-soak-log/soak.log
        ;;
    wait)
        while [ ! -f "$W/done" ]; do sleep 5; done
        cat /tmp/ngx-soak-log/soak.log
        mkdir -p "$OUT"
        cp /tmp/ngx-soak-log/soak.log "$OUT/soak.log"
        cp "$W/samples" "$OUT/soak-samples.txt"
        cp "$W/logs/error.log" "$OUT/soak-error.log"
        ;;
    *) echo "usage: $0 run|start|wait" >&2; exit 2 ;;
esac
