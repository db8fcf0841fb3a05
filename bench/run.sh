#!/usr/bin/env bash
# The HTTP benchmark, everything in one call on the GPU machine (see the README):
#
#   make gpu-bundle        # here: nginx, the module, wrk, bench-gpu_ops into .gpu/
#   bash bench/run.sh      # there, from the repository root, .gpu/ carried
#
# One nginx build, the same worker count and the same client (wrk) for everything:
#   - ceiling: `return 200` (requests/s) and a location that reads the whole body and
#     answers a constant (bytes/s);
#   - gpu_process echo / blake3 on the GPU path, gpu_batch_size 128 (default) and 1;
#   - the same ops on the CPU path (a second nginx with no device visible);
#   - the two-tier stack: the same nginx proxying (keepalive upstream) to aiohttp
#     processes (as many as workers) doing the work on the GPU with PyTorch
#     (bench/two_tier.py);
# for bodies of 64 B, 1 KiB, 64 KiB, 1 MiB and 16 MiB; then latency at half of each
# one's peak for 1 KiB bodies; and the PCIe reference (pinned memcpy, bench-gpu_ops).
# Prints one table last; writes it and every wrk output under $OUT (or bench/out/).
#
# Knobs: BENCH_SECS (per run, default 4), BENCH_WORKERS (default 4), BENCH_SIZES,
# BENCH_WRK_THREADS (default 8), BENCH_SERVER_CPUS / BENCH_CLIENT_CPUS (taskset lists
# for the servers and for wrk, to keep the client off the servers' cores), BENCH_MAIN (extra main-context directives, e.g.
# "user root;");
# BENCH_DRY=1 tries the script where there is no GPU and no torch (two-tier echo from
# the CPU, no device check).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
G=$ROOT/.gpu
OUTDIR=${OUT:-$ROOT/bench/out}
mkdir -p "$OUTDIR"
SECS=${BENCH_SECS:-4}
WORKERS=${BENCH_WORKERS:-4}
SIZES=${BENCH_SIZES:-"64 1024 65536 1048576 16777216"}
export LD_LIBRARY_PATH=$G/lib:${LD_LIBRARY_PATH:-}
WRK=$G/bin/wrk
NGINX=$G/bin/nginx
SRV=()
CLI=()
[ -n "${BENCH_SERVER_CPUS:-}" ] && SRV=(taskset -c "$BENCH_SERVER_CPUS")
[ -n "${BENCH_CLIENT_CPUS:-}" ] && CLI=(taskset -c "$BENCH_CLIENT_CPUS")
LOG=$OUTDIR/bench-wrk.log
: >"$LOG"
W=$(mktemp -d /tmp/ngx-gpu-bench.XXXXXX)
chmod 755 "$W"   # nginx workers run as nobody
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for d in "$W"/gpu "$W"/cpu "$W"/poll; do [ -f "$d/logs/nginx.pid" ] && "$NGINX" -p "$d" -s quit 2>/dev/null; done
    # Workers log their GPU thread's counters as they exit: wait for them.
    for i in $(seq 1 50); do ls "$W"/*/logs/nginx.pid >/dev/null 2>&1 || break; sleep 0.2; done
    for f in gpu/logs/error.log poll/logs/error.log cpu/logs/error.log two_tier.log; do
        [ -f "$W/$f" ] && { echo "######## $f"; cat "$W/$f"; }
    done >"$OUTDIR/bench-servers.log" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

say() { echo "== $*" >&2; }
DRY=${BENCH_DRY:-0}
TT_DEVICE=cuda
[ "$DRY" = 1 ] && TT_DEVICE=cpu
if [ "$DRY" = 1 ]; then python3 -c 'import aiohttp' || exit 1
else python3 -c 'import aiohttp, torch' || { echo "python3 with aiohttp and torch is needed (present on the GPU machine)"; exit 1; }; fi

# Bodies: fresh random data of each size.
for n in $SIZES; do head -c "$n" /dev/urandom >"$W/body-$n"; done

# The two-tier backend: one aiohttp process per nginx worker.
UP=""
for i in $(seq 1 "$WORKERS"); do
    port=$((9100 + i))
    "${SRV[@]}" python3 "$ROOT/bench/two_tier.py" "$port" --repo "$ROOT" --device "$TT_DEVICE" >>"$W/two_tier.log" 2>&1 &
    PIDS+=($!)
    UP="$UP server 127.0.0.1:$port;"
done

conf() { # prefix port [http-level extra]
    mkdir -p "$1"/conf "$1"/logs "$1"/html "$1"/modules
    echo ok >"$1/html/ok"
    cp "$G/ngx_http_gpu_module.so" "$1/modules/"
    cat >"$1/conf/nginx.conf" <<EOF
load_module modules/ngx_http_gpu_module.so;
worker_processes $WORKERS;
${BENCH_MAIN:-}
error_log logs/error.log notice;
pid logs/nginx.pid;
env CUDA_VISIBLE_DEVICES;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_max_body_size 64m;
    # Every body in memory, for every location alike.
    client_body_buffer_size 17m;
    ${3:-}
    upstream two_tier { $UP keepalive 256; }
    server {
        listen 127.0.0.1:$2 backlog=4096;
        add_header X-Batch \$gpu_batch_size;
        add_header X-Device \$gpu_device;
        location = /ret { return 200 "ok\n"; }
        # Reads the whole body (mirror_request_body), then answers a constant.
        location = /read {
            mirror /sink; mirror_request_body on;
            error_page 405 =200 @ok; root html; try_files /ok =404;
        }
        location @ok { return 200 "ok\n"; }
        location = /sink { internal; return 204; }
        location = /echo { gpu_process echo; }
        location = /echo1 { gpu_process echo; gpu_batch_size 1; }
        location = /blake3 { gpu_process blake3; }
        location = /blake31 { gpu_process blake3; gpu_batch_size 1; }
        location /tt/ {
            proxy_pass http://two_tier/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }
    }
}
EOF
}
conf "$W/gpu" 8081
conf "$W/cpu" 8082
# The same, with the GPU thread spinning up to 200 us on in-flight batches (gpu_poll).
conf "$W/poll" 8083 "gpu_poll 200us;"
"${SRV[@]}" "$NGINX" -p "$W/gpu" -c conf/nginx.conf || exit 1
"${SRV[@]}" "$NGINX" -p "$W/poll" -c conf/nginx.conf || exit 1
CUDA_VISIBLE_DEVICES="" "${SRV[@]}" "$NGINX" -p "$W/cpu" -c conf/nginx.conf || exit 1
for i in $(seq 1 100); do
    ok=1
    for p in $(seq 9101 $((9100 + WORKERS))); do curl -sf --max-time 60 "http://127.0.0.1:$p/health" >/dev/null || ok=0; done
    [ $ok = 1 ] && break
    sleep 0.2
done
[ $ok = 1 ] || { echo "two-tier backend did not start:"; cat "$W/two_tier.log"; exit 1; }
sleep 1
grep -h "gpu: " "$W/gpu/logs/error.log" | head -2 >&2
grep -h "gpu: " "$W/cpu/logs/error.log" | head -1 >&2

# Correctness first: every path answers the same for every size.
fail=0
for n in $SIZES; do
    b="$W/body-$n"
    want=$(python3 -c 'import sys; print(open(sys.argv[1],"rb").read().__len__())' "$b")
    for url in 8081/echo 8081/echo1 8083/echo 8082/echo 8081/tt/echo; do
        curl -sf --max-time 60 --data-binary @"$b" "http://127.0.0.1:$url" -o "$W/out" && cmp -s "$b" "$W/out" \
            || { echo "WRONG: echo $n via $url"; fail=1; }
    done
    ref=$(curl -sf --max-time 60 --data-binary @"$b" "http://127.0.0.1:8082/blake3")
    tt=8081/tt/blake3
    [ "$DRY" = 1 ] && tt=""
    for url in 8081/blake3 8081/blake31 8083/blake3 $tt; do
        got=$(curl -sf --max-time 60 --data-binary @"$b" "http://127.0.0.1:$url")
        [ -n "$ref" ] && [ "$got" = "$ref" ] || { echo "WRONG: blake3 $n via $url: $got vs $ref"; fail=1; }
    done
    dev=$(curl -sf --max-time 60 -o /dev/null -D - --data-binary @"$b" http://127.0.0.1:8081/echo | tr -d '\r' | awk -F': ' '/^X-Device/{print $2}')
    # Any GPU: workers spread over every visible one (gpu_devices all).
    case $dev in gpu[0-9]*) ;; *) [ "$DRY" = 1 ] || { echo "WRONG: GPU nginx answered from '$dev'"; fail=1; } ;; esac
    : "$want"
done
[ $fail = 0 ] || { echo "correctness check failed"; exit 1; }
say "correctness: every path agrees for sizes $SIZES"

conns() { # size -> connections
    if [ "$1" -le 65536 ]; then echo 256; elif [ "$1" -le 1048576 ]; then echo 64; else echo 16; fi
}

# wrk URL SIZE CONNS [PACE_MS] [batch] -> "rps p50_ms p99_ms non2xx mean_batch"
run_wrk() {
    local url=$1 n=$2 c=$3 pace=${4:-0} extra=${5:-}
    local t=${BENCH_WRK_THREADS:-8}
    t=$((c < t ? c : t))
    local out
    out=$("${CLI[@]}" "$WRK" -t"$t" -c"$c" -d"${SECS}s" --timeout 30s --latency -s "$ROOT/bench/post.lua" "$url" \
        -- "$W/body-$n" "$pace" $extra 2>&1)
    { echo "### $url size=$n conns=$c pace=$pace $extra"; echo "$out"; } >>"$LOG"
    python3 - "$out" <<'EOF'
import re, sys
out = sys.argv[1]
def ms(v, u):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
lat = dict((p, ms(v, u)) for p, v, u in re.findall(r"^\s+(50|99)\.000%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M))
if not lat:
    lat = dict((p, ms(v, u)) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
errs = re.search(r"Socket errors:.*timeout (\d+)", out)
mb = re.search(r"mean_batch ([\d.]+)", out)
print(rps.group(1) if rps else "0", lat.get("50", float("nan")), lat.get("99", float("nan")),
      (int(bad.group(1)) if bad else 0) + (int(errs.group(1)) if errs else 0),
      mb.group(1) if mb else "-")
EOF
}

# The PCIe reference, measured in this same call.
PCIE=$("$G/bin/bench-gpu_ops" 2>&1 | tee "$OUTDIR/bench-gpu_ops.log" | grep "pinned memcpy 16 MiB" || true)
say "reference: $PCIE"
H2D=$(echo "$PCIE" | sed -n 's/.*H2D \([0-9.]*\) GB\/s.*/\1/p')
D2H=$(echo "$PCIE" | sed -n 's/.*D2H \([0-9.]*\) GB\/s.*/\1/p')

TARGETS="ret:8081/ret read:8081/read gpu_echo:8081/echo gpu_echo_b1:8081/echo1 gpu_blake3:8081/blake3 gpu_blake3_b1:8081/blake31 poll_echo:8083/echo poll_blake3:8083/blake3 cpu_echo:8082/echo cpu_blake3:8082/blake3 tt_echo:8081/tt/echo tt_blake3:8081/tt/blake3"
RES=$W/results
: >"$RES"
for n in $SIZES; do
    c=$(conns "$n")
    for tg in $TARGETS; do
        name=${tg%%:*}
        url=http://127.0.0.1:${tg#*:}
        r=$(run_wrk "$url" "$n" "$c")
        echo "$n $name $r" >>"$RES"
        say "size $n $name: $r"
    done
done

# Mean batch size at peak for 1 KiB echo on the GPU path (a short run that reads headers).
MB=$(run_wrk http://127.0.0.1:8081/echo 1024 256 0 batch | awk '{print $5}')

# Latency at half of each one's own peak, 1 KiB bodies: each connection waits 1 ms
# before each request, so connections = rate x (1 ms + ~0.5 ms answer) offer about the
# rate asked for (the table shows what was achieved).
LAT=$W/latency
: >"$LAT"
for tg in ret:8081/ret gpu_echo:8081/echo gpu_echo_b1:8081/echo1 gpu_blake3:8081/blake3 poll_echo:8083/echo poll_blake3:8083/blake3 cpu_echo:8082/echo tt_echo:8081/tt/echo; do
    name=${tg%%:*}
    peak=$(awk -v n="$name" '$1 == 1024 && $2 == n {print $3}' "$RES")
    c=$(python3 -c "print(max(8, min(4000, round(float('$peak') / 2 * 0.0015))))")
    r=$(run_wrk "http://127.0.0.1:${tg#*:}" 1024 "$c" 1)
    echo "$name $peak $c $r" >>"$LAT"
    say "latency $name at half of $peak: $r"
done

# Stop the servers first so that their workers log their counters.
for d in "$W"/gpu "$W"/cpu "$W"/poll; do "$NGINX" -p "$d" -s quit 2>/dev/null; done
for i in $(seq 1 50); do ls "$W"/*/logs/nginx.pid >/dev/null 2>&1 || break; sleep 0.2; done
BENCH_W=$W python3 - "$RES" "$LAT" "$H2D" "$D2H" "$MB" "$SECS" "$WORKERS" <<'EOF' | tee "$OUTDIR/bench-results.md"
import sys, math
res, lat, h2d, d2h, mb, secs, workers = sys.argv[1:]
rows = {}
for line in open(res):
    n, name, rps, p50, p99, bad, _ = line.split()
    rows[(int(n), name)] = (float(rps), float(p50), float(p99), int(bad))
sizes = sorted({k[0] for k in rows})
def size(n):
    return f"{n // 1048576} MiB" if n >= 1048576 else f"{n // 1024} KiB" if n >= 1024 else f"{n} B"
names = [("gpu_echo", "echo GPU, batching on"), ("gpu_echo_b1", "echo GPU, gpu_batch_size 1"),
         ("poll_echo", "echo GPU, batching on, gpu_poll 200us"),
         ("cpu_echo", "echo CPU path"), ("tt_echo", "echo two-tier (aiohttp+PyTorch)"),
         ("gpu_blake3", "blake3 GPU, batching on"), ("gpu_blake3_b1", "blake3 GPU, gpu_batch_size 1"),
         ("poll_blake3", "blake3 GPU, batching on, gpu_poll 200us"),
         ("cpu_blake3", "blake3 CPU path"), ("tt_blake3", "blake3 two-tier (aiohttp+PyTorch+kernel)")]
print(f"## HTTP benchmark: {workers} nginx workers, wrk, {secs} s per run\n")
print("Requests/s (p50 / p99 ms at that load, closed loop), errors if any:\n")
print("| path | " + " | ".join(size(n) for n in sizes) + " |")
print("|---|" + "---|" * len(sizes))
def cell(k):
    if k not in rows:
        return "-"
    rps, p50, p99, bad = rows[k]
    e = f", {bad} errors" if bad else ""
    return f"{rps:,.0f} ({p50:.2f} / {p99:.2f}){e}"
for key, label in [("ret", "nginx `return 200` (ceiling, requests/s)"), ("read", "nginx reads the body, answers a constant")] + names:
    print(f"| {label} | " + " | ".join(cell((n, key)) for n in sizes) + " |")
print("\nBody GB/s (requests/s x body size):\n")
print("| path | " + " | ".join(size(n) for n in sizes) + " |")
print("|---|" + "---|" * len(sizes))
for key, label in [("read", "nginx reads the body (ceiling, bytes/s)")] + names:
    print(f"| {label} | " + " | ".join(f"{rows[(n, key)][0] * n / 1e9:.2f}" if (n, key) in rows else "-" for n in sizes) + " |")
print("\nRatios:\n")
print("| ratio | " + " | ".join(size(n) for n in sizes) + " |")
print("|---|" + "---|" * len(sizes))
def ratio(a, b, n):
    if (n, a) not in rows or (n, b) not in rows or rows[(n, b)][0] == 0:
        return "-"
    return f"{rows[(n, a)][0] / rows[(n, b)][0]:.2f}x"
for a, b, label in [("gpu_echo", "tt_echo", "echo GPU / two-tier"), ("gpu_echo", "ret", "echo GPU / `return 200`"),
                    ("gpu_echo", "gpu_echo_b1", "echo GPU batching on / off"),
                    ("poll_echo", "tt_echo", "echo GPU gpu_poll 200us / two-tier"), ("poll_echo", "ret", "echo GPU gpu_poll 200us / `return 200`"), ("gpu_echo", "cpu_echo", "echo GPU / CPU path"),
                    ("gpu_blake3", "tt_blake3", "blake3 GPU / two-tier"), ("gpu_blake3", "read", "blake3 GPU / nginx reading the body"),
                    ("gpu_blake3", "gpu_blake3_b1", "blake3 GPU batching on / off"),
                    ("poll_blake3", "read", "blake3 GPU gpu_poll 200us / nginx reading the body"), ("gpu_blake3", "cpu_blake3", "blake3 GPU / CPU path")]:
    print(f"| {label} | " + " | ".join(ratio(a, b, n) for n in sizes) + " |")
print("\nLatency at half of each path's own peak, 1 KiB bodies (paced: each connection waits 1 ms before each request):\n")
print("| path | peak req/s | offered ~ req/s (achieved) | connections | p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
for line in open(lat):
    name, peak, c, rps, p50, p99, bad, _ = line.split()
    print(f"| {name} | {float(peak):,.0f} | {float(peak) / 2:,.0f} ({float(rps):,.0f}) | {c} | {float(p50):.3f} | {float(p99):.3f} | {bad} |")
print(f"\nMean $gpu_batch_size at peak, 1 KiB echo on the GPU path: {mb}")
print("\nGPU threads' own counters at exit (per worker, all runs of that nginx), from bench-servers.log:\n")
import glob, os
for name in ("gpu", "poll", "cpu"):
    f = os.path.join(os.environ.get("BENCH_W", ""), name, "logs", "error.log")
    if os.path.exists(f):
        for line in open(f):
            if " batches, " in line:
                print(f"- {name}: " + line.split("gpu: ", 1)[1].strip())
try:
    h, d = float(h2d), float(d2h)
    print(f"\nPCIe reference (pinned memcpy 16 MiB, same call): H2D {h:.1f} GB/s, D2H {d:.1f} GB/s.")
    for n in sizes:
        if n < 1048576:
            continue
        e = rows.get((n, "gpu_echo"), (0,))[0] * n / 1e9
        b = rows.get((n, "gpu_blake3"), (0,))[0] * n / 1e9
        print(f"- {size(n)}: echo moves {e:.2f} GB/s each way ({100 * e / h:.0f}% of H2D, {100 * e / d:.0f}% of D2H); "
              f"blake3 moves {b:.2f} GB/s host->device ({100 * b / h:.0f}% of H2D)")
except ValueError:
    print("\nPCIe reference: not measured")
EOF
