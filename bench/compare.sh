#!/usr/bin/env bash
# Two builds of the module, same nginx, same configuration, same machine, one run: is the
# second as fast as the first? Runs on the GPU machine from the repository root with .gpu/
# carried (make gpu-bundle), the earlier module in .gpu/before/ngx_http_gpu_module.so.
#
#   bash bench/compare.sh            (COMPARE_SECS=5 per measurement, ROUNDS=2)
#
# The builds take turns, the order flipped every round (A B, B A, A B, ...) so that drift on
# a shared machine hits both alike; each scenario's figure is the median over the rounds. 4 workers on the GPU, wrk on cores of its
# own (12-15), nginx on 0-11. Prints one table last; logs go to $OUT/compare.log.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
G=$ROOT/.gpu
OUT=${OUT:-/tmp/gpu-out}
SECS=${COMPARE_SECS:-5}
ROUNDS=${ROUNDS:-4}
W=/tmp/ngx-compare
LOG=$OUT/compare.log
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$G/lib"
mkdir -p "$OUT"
: >"$LOG"

declare -A MODULE=([before]=$G/before/ngx_http_gpu_module.so [after]=$G/ngx_http_gpu_module.so)
# name  path  body-bytes  connections
SCENARIOS="echo_1k_c64:/echo:1024:64 echo_1k_c256:/echo:1024:256 blake3_1k_c64:/blake3:1024:64 \
blake3_1k_c256:/blake3:1024:256 blake3_64k_c64:/blake3:65536:64 echo_1m_c16:/echo:1048576:16"

start() { # build
    rm -rf "$W/$1"; mkdir -p "$W/$1"/{conf,logs,modules}
    cp "${MODULE[$1]}" "$W/$1/modules/ngx_http_gpu_module.so"
    cat >"$W/$1/conf/nginx.conf" <<'EOF'
load_module modules/ngx_http_gpu_module.so;
worker_processes 4;
error_log logs/error.log notice;
pid logs/nginx.pid;
env CUDA_VISIBLE_DEVICES;
events { worker_connections 8192; }
http {
    access_log off;
    client_max_body_size 16m;
    client_body_buffer_size 2m;
    server {
        listen 127.0.0.1:8092 backlog=4096;
        location = /echo { gpu_process echo; }
        location = /blake3 { gpu_process blake3; }
    }
}
EOF
    taskset -c 0-11 "$G/bin/nginx" -p "$W/$1" -c conf/nginx.conf || return 1
    for _ in $(seq 100); do
        [ "$(grep -c 'gpu: using' "$W/$1/logs/error.log")" -ge 4 ] && return 0
        sleep 0.1
    done
    echo "the $1 build's workers did not open the GPU:"; cat "$W/$1/logs/error.log"; return 1
}

stop() {
    "$G/bin/nginx" -p "$W/$1" -s quit 2>/dev/null
    for _ in $(seq 50); do [ -f "$W/$1/logs/nginx.pid" ] || break; sleep 0.1; done
    grep "gpu: .* batches" "$W/$1/logs/error.log" >>"$LOG"
}

measure() { # url bytes conns -> "rps p50_ms p99_ms errors"
    local out
    out=$(taskset -c 12-15 "$G/bin/wrk" -t4 -c"$3" -d"${SECS}s" --latency -s "$ROOT/bench/post.lua" \
        "http://127.0.0.1:8092$1" -- "$W/body-$2" 0 2>&1)
    echo "$out" >>"$LOG"
    python3 - "$out" <<'EOF'
import re, sys
out = sys.argv[1]
def ms(v, u):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[u]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
lat = dict((p, ms(v, u)) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
err = re.search(r"Socket errors:.*timeout (\d+)", out)
print(rps.group(1) if rps else "0", lat.get("50", float("nan")), lat.get("99", float("nan")),
      (int(bad.group(1)) if bad else 0) + (int(err.group(1)) if err else 0))
EOF
}

mkdir -p "$W"
for n in 1024 65536 1048576; do head -c $n /dev/urandom >"$W/body-$n"; done
: >"$W/results"
for round in $(seq "$ROUNDS"); do
    order="before after"
    [ $((round % 2)) = 0 ] && order="after before"
    for build in $order; do
        start $build || exit 1
        # Warm-up: buffers grow, contexts settle.
        taskset -c 12-15 "$G/bin/wrk" -t4 -c64 -d2s -s "$ROOT/bench/post.lua" \
            http://127.0.0.1:8092/echo -- "$W/body-1024" 0 >/dev/null 2>&1
        for sc in $SCENARIOS; do
            IFS=: read -r name path bytes conns <<<"$sc"
            r=$(measure "$path" "$bytes" "$conns")
            echo "$round $build $name $r" | tee -a "$W/results"
        done
        stop $build
    done
done

python3 - "$W/results" <<'EOF' | tee "$OUT/compare.md"
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
names = []
for r in rows:
    if r[2] not in names:
        names.append(r[2])
def med(build, name, col):
    v = [float(r[col]) for r in rows if r[1] == build and r[2] == name]
    return statistics.median(v) if v else float("nan")
print("| scenario (4 workers) | before req/s | after req/s | after/before | p50 ms before/after | p99 ms before/after | errors |")
print("|---|---|---|---|---|---|---|")
for n in names:
    b, a = med("before", n, 3), med("after", n, 3)
    errs = sum(int(r[6]) for r in rows if r[2] == n)
    print(f"| {n} | {b:,.0f} | {a:,.0f} | {a / b:.2f}x | {med('before', n, 4):.2f} / {med('after', n, 4):.2f} "
          f"| {med('before', n, 5):.2f} / {med('after', n, 5):.2f} | {errs} |")
EOF
