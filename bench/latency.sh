#!/usr/bin/env bash
# Moderate concurrency and latency on the GPU machine, one run of under 4 minutes (issue 12,
# item 2; see the README, "Measured"):
#
#   make gpu-bundle            # here: nginx, the module, wrk into .gpu/
#   bash bench/latency.sh      # there, as root, from the repository root, .gpu/ carried
#
# nginx (BENCH_WORKERS, default 4) on cores 0-7, wrk on 8-15. 1 KiB bodies. For each of
#   - the GPU path without MPS, with gpu_poll 0 and with the default gpu_poll (100us where
#     workers x 2 <= the server's cores, as here; or gpu_poll $BENCH_POLL where set);
#   - the same with a private MPS control daemon the script starts (and stops) itself,
#     workers `user root;`;
#   - the CPU path (a nginx with no device visible) and `return 200`;
# it runs `echo` and `blake3` at 16 and 64 connections per worker (closed loop), one
# connection alone on the idle server (wrk's latency distribution), and `echo` at half of
# the 16-per-worker peak (paced: each connection waits 1 ms before each request). Prints
# one table: req/s, ratio to `return 200` at the same connections, p50/p99, the goals, and
# the GPU threads' per-batch counters each worker logged at exit.
#
# Knobs: BENCH_SECS (per run, default 3), BENCH_WORKERS (4), BENCH_POLL (default: none),
# BENCH_SERVER_CPUS / BENCH_CLIENT_CPUS (taskset lists, 0-7 / 8-15), BENCH_MPS (auto: on
# where nvidia-cuda-mps-control is found and this is root; off: skip the MPS half).
# BENCH_DRY=1 tries the script where there is no GPU: binaries from this checkout's build
# (target/release, the fault-injection module for the "GPU" path, which then runs on the
# test device of src/gpu/fake.rs), no MPS, no taskset unless asked. Dry figures are not GPU
# figures.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
G=$ROOT/.gpu
OUTDIR=${OUT:-$ROOT/bench/out}
mkdir -p "$OUTDIR"
SECS=${BENCH_SECS:-3}
WORKERS=${BENCH_WORKERS:-4}
POLL=${BENCH_POLL:-}
POLLCONF=""
[ -n "$POLL" ] && POLLCONF="gpu_poll $POLL;"
DRY=${BENCH_DRY:-0}
if [ "$DRY" = 1 ]; then
    NGINX=${BENCH_NGINX:-$(ls -d "$ROOT"/target/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n1)}
    MODULE=${BENCH_MODULE:-$ROOT/target/release/libngx_http_gpu_module.so}
    GPU_MODULE=${BENCH_GPU_MODULE:-$ROOT/target/release/fault-injection/libngx_http_gpu_module.so}
    WRK=${BENCH_WRK:-$(command -v wrk)}
    SRV_CPUS=${BENCH_SERVER_CPUS:-}
    CLI_CPUS=${BENCH_CLIENT_CPUS:-}
    MPS=off
else
    NGINX=${BENCH_NGINX:-$G/bin/nginx}
    MODULE=${BENCH_MODULE:-$G/ngx_http_gpu_module.so}
    GPU_MODULE=$MODULE
    WRK=${BENCH_WRK:-$G/bin/wrk}
    SRV_CPUS=${BENCH_SERVER_CPUS:-0-7}
    CLI_CPUS=${BENCH_CLIENT_CPUS:-8-15}
    MPS=${BENCH_MPS:-auto}
    export LD_LIBRARY_PATH=$G/lib:${LD_LIBRARY_PATH:-}
fi
for f in "$NGINX" "$MODULE" "$GPU_MODULE" "$WRK"; do
    [ -x "$f" ] || [ -f "$f" ] || { echo "missing: $f (make gpu-bundle, or cargo build --release / make fault-module for BENCH_DRY=1)"; exit 1; }
done
if [ "$MPS" = auto ]; then
    MPS=off
    [ "$(id -u)" = 0 ] && command -v nvidia-cuda-mps-control >/dev/null && MPS=on
fi
SRV=()
CLI=()
[ -n "$SRV_CPUS" ] && SRV=(taskset -c "$SRV_CPUS")
[ -n "$CLI_CPUS" ] && CLI=(taskset -c "$CLI_CPUS")
MAIN=""
[ "$(id -u)" = 0 ] && MAIN="user root;"

W=$(mktemp -d /tmp/ngx-gpu-latency.XXXXXX)
chmod 755 "$W"
LOG=$OUTDIR/latency-wrk.log
: >"$LOG"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
head -c 1024 /dev/urandom >"$W/body"
SERVERS=()
say() { echo "== $*" >&2; }

stop_all() {
    for s in "${SERVERS[@]}"; do
        [ -f "$W/$s/logs/nginx.pid" ] && "$NGINX" -p "$W/$s" -s quit 2>/dev/null
    done
    # Workers log their GPU thread's counters as they exit: wait for them.
    for _ in $(seq 1 100); do ls "$W"/*/logs/nginx.pid >/dev/null 2>&1 || break; sleep 0.1; done
    SERVERS=()
}
mps_quit() {
    [ -d "$W/mps/pipe" ] && CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log \
        sh -c 'echo quit | nvidia-cuda-mps-control' >/dev/null 2>&1
}
cleanup() {
    stop_all
    mps_quit
    for f in "$W"/*/logs/error.log; do echo "######## $f"; cat "$f"; done >"$OUTDIR/latency-servers.log" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

start() { # name port module http-extra [env...]
    local name=$1 port=$2 module=$3 extra=$4
    shift 4
    mkdir -p "$W/$name"/{conf,logs,modules}
    cp "$module" "$W/$name/modules/ngx_http_gpu_module.so"
    cat >"$W/$name/conf/nginx.conf" <<EOF
load_module modules/ngx_http_gpu_module.so;
worker_processes $WORKERS;
$MAIN
error_log logs/error.log notice;
pid logs/nginx.pid;
env CUDA_VISIBLE_DEVICES;
env CUDA_MPS_PIPE_DIRECTORY;
env CUDA_MPS_LOG_DIRECTORY;
env NGX_GPU_FAULTS;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_buffer_size 64k;
    $extra
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /ret { return 200 "ok\n"; }
        location = /echo { gpu_process echo; }
        location = /blake3 { gpu_process blake3; }
    }
}
EOF
    env "$@" "${SRV[@]}" "$NGINX" -p "$W/$name" -c conf/nginx.conf || exit 1
    SERVERS+=("$name")
    # Every worker says which device it uses (or why none) once its thread has tried.
    for _ in $(seq 1 150); do
        [ "$(grep -c 'gpu: using\|no usable GPU' "$W/$name/logs/error.log")" -ge "$WORKERS" ] && break
        sleep 0.1
    done
    local line on
    line=$(grep -ho 'gpu: using.*\|gpu: no usable GPU.*' "$W/$name/logs/error.log" | head -n1)
    on=$(grep -c 'gpu: using.*MPS: on' "$W/$name/logs/error.log")
    echo "$name ${line#gpu: } ($on of $WORKERS workers say MPS: on)" >>"$W/startlines"
    say "$name: ${line:-no start line}"
}

# wrk URL CONNS [PACE_MS] -> "rps p50_us p75_us p90_us p99_us errors"
run_wrk() {
    local url=$1 c=$2 pace=${3:-0}
    local t=$((c < 8 ? c : 8))
    local out
    out=$("${CLI[@]}" "$WRK" -t"$t" -c"$c" -d"${SECS}s" --timeout 10s --latency -s "$ROOT/bench/post.lua" \
        "$url" -- "$W/body" "$pace" 2>&1)
    { echo "### $url conns=$c pace=$pace"; echo "$out"; } >>"$LOG"
    python3 - "$out" <<'EOF'
import re, sys
out = sys.argv[1]
def us(v, u):
    return float(v) * {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 6e7}[u]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
lat = dict((p, us(v, u)) for p, v, u in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
errs = re.search(r"Socket errors:.*timeout (\d+)", out)
print(rps.group(1) if rps else "0", *(lat.get(p, float("nan")) for p in ("50", "75", "90", "99")),
      (int(bad.group(1)) if bad else 0) + (int(errs.group(1)) if errs else 0))
EOF
}

RES=$W/results
: >"$RES"
: >"$W/startlines"
measure() { # server port path conns [pace] -> a line in $RES
    local r
    r=$(run_wrk "http://127.0.0.1:$2$3" "$4" "${5:-0}")
    echo "$1 ${3#/} $4 ${5:-0} $r" >>"$RES"
    say "$1 $3 c=$4${5:+ paced}: $r"
}

check() { # port: echo answers the body, blake3 answers what the CPU path does
    curl -sf --max-time 10 --data-binary @"$W/body" "http://127.0.0.1:$1/echo" -o "$W/out" && cmp -s "$W/body" "$W/out" \
        || { echo "WRONG: echo on port $1"; exit 1; }
    local got
    got=$(curl -sf --max-time 10 --data-binary @"$W/body" "http://127.0.0.1:$1/blake3")
    [ -n "$REF" ] && [ "$got" = "$REF" ] || { echo "WRONG: blake3 on port $1: $got vs $REF"; exit 1; }
}

gpu_runs() { # server port: one connection alone first (idle server), then the load
    measure "$1" "$2" /echo 1
    measure "$1" "$2" /blake3 1
    local per
    for per in 16 64; do
        measure "$1" "$2" /echo $((per * WORKERS))
        measure "$1" "$2" /blake3 $((per * WORKERS))
    done
    # Half of the 16-per-worker echo peak: each connection waits 1 ms before each request,
    # so connections = rate x (1 ms + ~0.5 ms answer) offer about that rate.
    local peak c
    peak=$(awk -v s="$1" -v c=$((16 * WORKERS)) '$1 == s && $2 == "echo" && $3 == c && $4 == 0 {print $5}' "$RES")
    c=$(python3 -c "print(max(4, min(4000, round(float('${peak:-0}') / 2 * 0.0015))))")
    measure "$1" "$2" /echo "$c" 1
}

# 1. No MPS: the CPU path and `return 200`, the GPU path with gpu_poll 0 and the default.
NOMPS=(-u CUDA_MPS_PIPE_DIRECTORY -u CUDA_MPS_LOG_DIRECTORY)
GPUENV=()
[ "$DRY" = 1 ] && GPUENV=(NGX_GPU_FAULTS=fake)
start cpu 8301 "$MODULE" "" "${NOMPS[@]}" CUDA_VISIBLE_DEVICES=
start gpu 8302 "$GPU_MODULE" "gpu_poll 0;" "${NOMPS[@]}" "${GPUENV[@]}"
start gpu_poll 8303 "$GPU_MODULE" "$POLLCONF" "${NOMPS[@]}" "${GPUENV[@]}"
REF=$(curl -sf --max-time 10 --data-binary @"$W/body" http://127.0.0.1:8301/blake3)
for p in 8301 8302 8303; do check $p; done
say "correctness: echo and blake3 agree on every path"
# Warm-up: buffers grow, contexts settle (not measured).
for p in 8302 8303; do
    "${CLI[@]}" "$WRK" -t4 -c$((16 * WORKERS)) -d1s -s "$ROOT/bench/post.lua" "http://127.0.0.1:$p/echo" -- "$W/body" 0 >/dev/null 2>&1
done
measure ret 8301 /ret 1
for per in 16 64; do measure ret 8301 /ret $((per * WORKERS)); done
measure cpu 8301 /echo 1
measure cpu 8301 /blake3 1
for per in 16 64; do
    measure cpu 8301 /echo $((per * WORKERS))
    measure cpu 8301 /blake3 $((per * WORKERS))
done
gpu_runs gpu 8302
gpu_runs gpu_poll 8303
stop_all

# 2. With a private MPS control daemon (root: the workers run as root to reach it).
if [ "$MPS" = on ]; then
    mkdir -p "$W/mps/pipe" "$W/mps/log"
    export CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log
    if nvidia-cuda-mps-control -d; then
        sleep 0.5
        start mps 8304 "$GPU_MODULE" "gpu_poll 0;"
        start mps_poll 8305 "$GPU_MODULE" "$POLLCONF"
        for p in 8304 8305; do
            check $p
            "${CLI[@]}" "$WRK" -t4 -c$((16 * WORKERS)) -d1s -s "$ROOT/bench/post.lua" "http://127.0.0.1:$p/echo" -- "$W/body" 0 >/dev/null 2>&1
        done
        gpu_runs mps 8304
        gpu_runs mps_poll 8305
        stop_all
    else
        say "the MPS control daemon did not start: no MPS runs"
    fi
    mps_quit
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
fi
stop_all

COUNTERS=$W/counters
: >"$COUNTERS"
for s in cpu gpu gpu_poll mps mps_poll; do
    f=$W/$s/logs/error.log
    [ -f "$f" ] && grep -h " batches, " "$f" | sed "s/.*gpu: /$s /" >>"$COUNTERS"
done
python3 - "$RES" "$W/startlines" "$COUNTERS" "$WORKERS" "$SECS" "${POLL:-default}" "$DRY" <<'EOF' | tee "$OUTDIR/latency-results.md"
import sys
res, starts, counters, workers, secs, poll, dry = sys.argv[1:]
workers = int(workers)
rows = {}
for line in open(res):
    s, path, c, pace, rps, p50, p75, p90, p99, bad = line.split()
    rows[(s, path, int(c), pace != "0")] = (float(rps), float(p50), float(p75), float(p90), float(p99), int(bad))
label = {"ret": "`return 200`", "cpu": "CPU path", "gpu": "GPU, no MPS, gpu_poll 0", "gpu_poll": f"GPU, no MPS, gpu_poll {poll}",
         "mps": "GPU, MPS, gpu_poll 0", "mps_poll": f"GPU, MPS, gpu_poll {poll}"}
if dry == "1":
    label["gpu"] = "test device (dry run), gpu_poll 0"
    label["gpu_poll"] = f"test device (dry run), gpu_poll {poll}"
servers = [s for s in ["ret", "cpu", "gpu", "gpu_poll", "mps", "mps_poll"] if any(k[0] == s for k in rows)]
print(f"## Moderate concurrency and latency: {workers} workers, 1 KiB bodies, wrk, {secs} s per run"
      + (" (DRY RUN: no GPU, not GPU figures)" if dry == "1" else "") + "\n")
for line in open(starts):
    name, _, text = line.strip().partition(" ")
    print(f"- {label.get(name, name)}: {text or 'no start line'}")
def fmt(v):
    return "-" if v != v else f"{v / 1000:.3f}"
for per in (16, 64):
    c = per * workers
    ret = rows.get(("ret", "ret", c, False))
    print(f"\n### {per} connections per worker ({c} in all), closed loop\n")
    print("| path | op | req/s | / `return 200` | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for s in servers:
        for op in (["ret"] if s == "ret" else ["echo", "blake3"]):
            r = rows.get((s, op, c, False))
            if not r:
                continue
            ratio = f"{r[0] / ret[0]:.2f}x" if ret and ret[0] else "-"
            print(f"| {label[s]} | {op} | {r[0]:,.0f} | {ratio} | {fmt(r[1])} | {fmt(r[4])} | {r[5]} |")
print("\n### One connection alone, idle server (wrk's latency distribution, ms)\n")
print("| path | op | req/s | p50 | p75 | p90 | p99 | errors |")
print("|---|---|---|---|---|---|---|---|")
for s in servers:
    for op in (["ret"] if s == "ret" else ["echo", "blake3"]):
        r = rows.get((s, op, 1, False))
        if r:
            print(f"| {label[s]} | {op} | {r[0]:,.0f} | {fmt(r[1])} | {fmt(r[2])} | {fmt(r[3])} | {fmt(r[4])} | {r[5]} |")
print("\n### `echo` at half of its 16-per-worker peak (paced, 1 ms between requests per connection)\n")
print("| path | peak req/s | achieved req/s | connections | p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
for (s, op, c, paced), r in rows.items():
    if paced:
        peak = rows.get((s, op, 16 * workers, False), (0,))[0]
        print(f"| {label[s]} | {peak:,.0f} | {r[0]:,.0f} | {c} | {fmt(r[1])} | {fmt(r[4])} | {r[5]} |")
print("\n### Goals (issue 12)\n")
ret16 = rows.get(("ret", "ret", 16 * workers, False))
cpu16 = rows.get(("cpu", "echo", 16 * workers, False))
for s in servers:
    if s in ("ret", "cpu"):
        continue
    e = rows.get((s, "echo", 16 * workers, False))
    one = rows.get((s, "echo", 1, False))
    half = [r for (x, op, c, p), r in rows.items() if x == s and p]
    goals = []
    if e and ret16:
        goals.append(f"echo at {16 * workers} conns {e[0] / ret16[0]:.2f}x `return 200` (goal >= 0.5x): {'met' if e[0] >= 0.5 * ret16[0] else 'NOT met'}")
    if e and cpu16:
        goals.append(f"vs CPU path {e[0] / cpu16[0]:.2f}x (goal >= 1x): {'met' if e[0] >= cpu16[0] else 'NOT met'}")
    if half:
        goals.append(f"p50 at half load {half[0][1] / 1000:.3f} ms (goal <= 0.3): {'met' if half[0][1] <= 300 else 'NOT met'}")
    if one:
        goals.append(f"alone p50 {one[1]:.0f} us (goal <= 80): {'met' if one[1] <= 80 else 'NOT met'}, "
                     f"p99 {one[4]:.0f} us (goal <= 300): {'met' if one[4] <= 300 else 'NOT met'}")
    print(f"- {label[s]}: " + "; ".join(goals))
print("\n### GPU threads' counters at exit (per worker, every run of that nginx)\n")
for line in open(counters):
    s, _, text = line.strip().partition(" ")
    print(f"- {label.get(s, s)}: {text}")
EOF
