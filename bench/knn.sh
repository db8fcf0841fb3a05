#!/usr/bin/env bash
# The vector-search benchmark (issue 10), everything in one call on the GPU machine:
#
#   make gpu-bundle        # here: nginx, the module, wrk into .gpu/
#   bash bench/knn.sh      # there, from the repository root, .gpu/ carried
#
# An index of N x D float32 (random, made here with numpy), k = 10, clients each sending one
# query per request in KServe v2's binary format (bench/kserve.lua). For the module:
# precision fp32, tf32 and fp16, at 1, 64 and 256 connections (one client alone, a few
# dozen, hundreds), and latency at about half of each one's peak (paced connections); the
# CPU path (no device visible) briefly; the two-tier stack (the same nginx proxying to
# aiohttp + PyTorch processes, one per worker, bench/two_tier_knn.py); PyTorch in-process
# at the same batch sizes (bench/knn_torch.py). With MPS_RUNS="off on" everything GPU runs
# twice, without and with the MPS daemon (workers run as root then, like the daemon).
# GPU memory per worker and the index load time come from the same run. One table last;
# every wrk output under $OUT.
#
# Knobs: KNN_N (default 1000000), KNN_D (128), KNN_K (10), BENCH_SECS (4), BENCH_WORKERS (4),
# KNN_CONNS ("1 64 256"), MPS_RUNS ("off on"), KNN_IN_FLIGHT (the models' in_flight=, 2),
# KNN_SWEEP (below), BENCH_DRY=1 (no GPU, no torch: a small index, the CPU path only, to
# try the script).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
G=$ROOT/.gpu
OUTDIR=${OUT:-$ROOT/bench/out}
mkdir -p "$OUTDIR"
DRY=${BENCH_DRY:-0}
N=${KNN_N:-1000000}
D=${KNN_D:-128}
K=${KNN_K:-10}
SECS=${BENCH_SECS:-4}
WORKERS=${BENCH_WORKERS:-4}
CONNS=${KNN_CONNS:-"1 64 256"}
MPS_RUNS=${MPS_RUNS:-"off on"}
if [ "$DRY" = 1 ]; then N=${KNN_N:-2000}; MPS_RUNS=off; fi
export LD_LIBRARY_PATH=$G/lib:${LD_LIBRARY_PATH:-}
WRK=$G/bin/wrk
NGINX=$G/bin/nginx
LOG=$OUTDIR/knn-wrk.log
: >"$LOG"
W=$(mktemp -d /tmp/ngx-gpu-knn.XXXXXX)
chmod 755 "$W"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
PIDS=()
say() { echo "== $*" >&2; }
stop_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    PIDS=()
    for d in "$W"/n-*; do [ -f "$d/logs/nginx.pid" ] && "$NGINX" -p "$d" -s quit 2>/dev/null; done
    for i in $(seq 1 50); do ls "$W"/n-*/logs/nginx.pid >/dev/null 2>&1 || break; sleep 0.2; done
}
cleanup() {
    stop_all
    for f in "$W"/n-*/logs/error.log "$W"/two_tier.log; do
        [ -f "$f" ] && { echo "######## $f"; cat "$f"; }
    done >"$OUTDIR/knn-servers.log" 2>/dev/null
    [ "${MPS_STARTED:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control
    rm -rf "$W"
}
trap cleanup EXIT

# The index, its float16 copy, one query request (binary) and a reference answer.
say "making a $N x $D index"
python3 - "$W" "$N" "$D" "$K" <<'EOF' || exit 1
import json, sys
import numpy as np
w, n, d, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(7)
x = rng.standard_normal((n, d), dtype=np.float32)
np.save(f"{w}/index.npy", x)
np.save(f"{w}/index16.npy", x.astype(np.float16))
q = rng.standard_normal((1, d), dtype=np.float32)
head = json.dumps({
    "inputs": [{"name": "QUERY", "shape": [1, d], "datatype": "FP32",
                "parameters": {"binary_data_size": 4 * d}}],
    "outputs": [{"name": "IDS", "parameters": {"binary_data": True}},
                {"name": "SCORES", "parameters": {"binary_data": True}}],
    "parameters": {"k": k}}).encode()
open(f"{w}/req.bin", "wb").write(head + q.tobytes())
open(f"{w}/req.hlen", "w").write(str(len(head)))
s = (x.astype(np.float64) @ q[0].astype(np.float64))
top = np.argsort(-s, kind="stable")[:k]
open(f"{w}/want.txt", "w").write(" ".join(map(str, top)))
EOF
HLEN=$(cat "$W/req.hlen")

conf() { # dir port model-lines [main-extra]
    mkdir -p "$1"/conf "$1"/logs "$1"/modules
    cp "$G/ngx_http_gpu_module.so" "$1/modules/"
    cat >"$1/conf/nginx.conf" <<EOF
load_module modules/ngx_http_gpu_module.so;
worker_processes $WORKERS;
${4:-}
error_log logs/error.log notice;
pid logs/nginx.pid;
env CUDA_VISIBLE_DEVICES;
env CUDA_MPS_PIPE_DIRECTORY;
env CUDA_MPS_LOG_DIRECTORY;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 10000000;
    gpu_queue_size 8192;
    $3
    upstream two_tier { ${UP:-server 127.0.0.1:1;} keepalive 256; }
    server {
        listen 127.0.0.1:$2 backlog=4096;
        add_header X-Device \$gpu_device;
        location /v2 { gpu_process kserve; gpu_batch_size 1024; }
        location /tt/ {
            proxy_pass http://two_tier/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 120s;
        }
    }
}
EOF
}
FLIGHT=${KNN_IN_FLIGHT:-2}
MODELS="gpu_model f32 knn $W/index.npy precision=fp32 k=$K batch_rows=1024 in_flight=$FLIGHT;
    gpu_model t32 knn $W/index.npy precision=tf32 k=$K batch_rows=1024 in_flight=$FLIGHT;
    gpu_model f16 knn $W/index16.npy precision=fp16 k=$K batch_rows=1024 in_flight=$FLIGHT;"

# wrk URL CONNS [PACE_MS] -> "rps p50_ms p99_ms errors"
run_wrk() {
    local url=$1 c=$2 pace=${3:-0}
    local t=$((c < 8 ? c : 8))
    local out
    out=$($WRK -t"$t" -c"$c" -d"${SECS}s" --timeout 30s --latency -s "$ROOT/bench/kserve.lua" "$url" \
        -- "$W/req.bin" "$HLEN" "$pace" 2>&1)
    { echo "### $url conns=$c pace=$pace"; echo "$out"; } >>"$LOG"
    python3 - "$out" <<'EOF'
import re, sys
out = sys.argv[1]
def ms(v, u):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
lat = dict((p, ms(v, u)) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
errs = re.search(r"Socket errors:.*timeout (\d+)", out)
print(rps.group(1) if rps else "0", round(lat.get("50", float("nan")), 3), round(lat.get("99", float("nan")), 3),
      (int(bad.group(1)) if bad else 0) + (int(errs.group(1)) if errs else 0))
EOF
}

# Checks that a server's answer for the request equals the float64 reference's ids.
check() { # url
    curl -sf --max-time 120 -D "$W/ans.h" -H "Inference-Header-Content-Length: $HLEN" \
        --data-binary @"$W/req.bin" "$1" -o "$W/ans" || return 1
    python3 - "$W/ans" "$W/ans.h" "$W/want.txt" "$K" <<'EOF'
import json, re, sys
import numpy as np
body = open(sys.argv[1], "rb").read()
hlen = int(re.search(r"(?im)^inference-header-content-length:\s*(\d+)", open(sys.argv[2]).read()).group(1))
want = open(sys.argv[3]).read().split()
k = int(sys.argv[4])
head = json.loads(body[:hlen])
off = hlen
for o in head["outputs"]:
    size = o["parameters"]["binary_data_size"]
    if o["name"] == "IDS":
        ids = np.frombuffer(body[off:off + size], dtype="<i8")
    off += size
got = list(map(str, ids[:k]))
# Exact for fp32; tf32 and fp16 products may swap near-ties: report recall, fail below 0.8.
recall = len(set(got) & set(want)) / len(want)
print(f"recall@{k} {recall:.2f}" + ("" if got == want else f" (order: {got} vs {want})"), file=sys.stderr)
sys.exit(0 if got == want or recall >= 0.8 else 1)
EOF
}

# busy STAT0 STAT1 CPUS... -> for each cpu list ("0-11", "12,14"), how many of its cpus were
# busy between the two /proc/stat snapshots (e.g. "11.8/12": where the host runs out). The
# GPU threads spin while a batch is in flight (gpu_poll), so busy server cpus are not all
# request work.
busy() {
    python3 - "$@" <<'EOF'
import sys
def read(path):
    out = {}
    for line in open(path):
        f = line.split()
        v = list(map(int, f[1:]))
        out[int(f[0][3:])] = (sum(v) - v[3] - v[4], sum(v))
    return out
def cpus(spec):
    got = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        got += range(int(a), int(b or a) + 1)
    return got
a, b = read(sys.argv[1]), read(sys.argv[2])
res = []
for spec in sys.argv[3:]:
    cs = [c for c in cpus(spec) if c in a and c in b]
    used = sum((b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]) for c in cs)
    res.append(f"{used:.1f}/{len(cs)}")
print(" ".join(res))
EOF
}

# KNN_SWEEP="WORKERS:SERVER_CPUS:CLIENT_CPUS:POLL ...": instead of the whole benchmark, the
# module alone (MPS on where it starts) with single-query requests to the fp32 and fp16 models
# at KNN_CONNS for each setup (e.g. "4:0-7:8-15:default 8:0-11:12-15:default"; POLL is a
# gpu_poll value, "default", or delay=TIME for gpu_batch_delay TIME): where the host side
# runs out. One table on stdout and in
# $OUT/knn-sweep.md; the workers' per-batch counters in knn-servers.log. KNN_SWEEP_MODELS
# picks the models ("f32 f16"; t32 is the float32 index searched with TF32).
if [ -n "${KNN_SWEEP:-}" ]; then
    MAIN=""
    mps=off
    if [ "$DRY" != 1 ] && [ "$(id -u)" = 0 ] && command -v nvidia-cuda-mps-control >/dev/null; then
        export CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        nvidia-cuda-mps-control -d && MPS_STARTED=1 && mps=on && MAIN="user root;"
    fi
    SW=$OUTDIR/knn-sweep.md
    {
        echo "# knn sweep: N=$N D=$D k=$K, single-query KServe binary requests, wrk ${SECS}s a row, MPS $mps"
        echo
        echo "| workers | nginx cpus | wrk cpus | gpu_poll | model | conns | req/s | p50 ms | p99 ms | errors | nginx cpus busy | wrk cpus busy |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
    } >"$SW"
    sweep_n=0
    for setup in $KNN_SWEEP; do
        IFS=: read -r WORKERS scpus ccpus poll <<<"$setup"
        case $poll in
        default) extra="" ;;
        delay=*) extra="gpu_batch_delay ${poll#delay=};" ;;
        *) extra="gpu_poll $poll;" ;;
        esac
        d=$W/n-sweep-$sweep_n
        sweep_n=$((sweep_n + 1))
        conf "$d" 8091 "$extra $MODELS" "$MAIN"
        taskset -c "$scpus" "$NGINX" -p "$d" -c conf/nginx.conf || { say "sweep $setup: nginx did not start"; continue; }
        for _ in $(seq 1 600); do
            dev=$(curl -s -o /dev/null -D - --max-time 5 -H "Inference-Header-Content-Length: $HLEN" \
                --data-binary @"$W/req.bin" "http://127.0.0.1:8091/v2/models/f16/infer" | tr -d '\r' \
                | awk '/^X-Device/{print $2}')
            case $dev in gpu*) break ;; esac
            [ "$DRY" = 1 ] && [ -n "$dev" ] && break
            sleep 0.2
        done
        sleep 1 # every worker's device open, not only the one that answered
        for m in ${KNN_SWEEP_MODELS:-f32 f16}; do
            for c in $CONNS; do
                grep '^cpu[0-9]' /proc/stat >"$W/stat0"
                read -r rps p50 p99 bad <<<"$(WRK="taskset -c $ccpus $WRK" run_wrk "http://127.0.0.1:8091/v2/models/$m/infer" "$c")"
                grep '^cpu[0-9]' /proc/stat >"$W/stat1"
                read -r sbusy cbusy <<<"$(busy "$W/stat0" "$W/stat1" "$scpus" "$ccpus")"
                printf '| %s | %s | %s | %s | %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$WORKERS" "$scpus" "$ccpus" "$poll" \
                    "$m" "$c" "$rps" "$p50" "$p99" "$bad" "$sbusy" "$cbusy" | tee -a "$SW"
            done
        done
        "$NGINX" -p "$d" -s quit
        for _ in $(seq 1 50); do [ -f "$d/logs/nginx.pid" ] || break; sleep 0.2; done
    done
    exit 0
fi

ROWS=()
row() { ROWS+=("$(printf '| %s | %s | %s | %s | %s | %s |' "$@")"); say "${ROWS[-1]}"; }

for mps in $MPS_RUNS; do
    MAIN=""
    if [ "$mps" = on ]; then
        export CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        nvidia-cuda-mps-control -d && MPS_STARTED=1 || { say "MPS daemon did not start"; continue; }
        MAIN="user root;"
    fi
    # Two-tier backends: one aiohttp + PyTorch process per worker, the index on the GPU.
    UP=""
    if [ "$DRY" != 1 ]; then
        for i in $(seq 1 "$WORKERS"); do
            port=$((9200 + i))
            python3 "$ROOT/bench/two_tier_knn.py" "$port" "$W/index.npy" >>"$W/two_tier.log" 2>&1 &
            PIDS+=($!)
            UP="$UP server 127.0.0.1:$port;"
        done
    fi
    d=$W/n-gpu-$mps
    conf "$d" 8091 "$MODELS" "$MAIN"
    t0=$(date +%s.%N)
    "$NGINX" -p "$d" -c conf/nginx.conf || exit 1
    # Ready when a search is answered from a device (dry: answered at all): the index is
    # loaded and uploaded by then.
    for i in $(seq 1 600); do
        dev=$(curl -s -o /dev/null -D - --max-time 5 -H "Inference-Header-Content-Length: $HLEN" \
            --data-binary @"$W/req.bin" http://127.0.0.1:8091/v2/models/f32/infer \
            | tr -d '\r' | awk -F': ' '/^X-Device/{print $2}')
        case "$dev" in gpu*) break ;; cpu) [ "$DRY" = 1 ] && break ;; esac
        sleep 0.1
    done
    t1=$(date +%s.%N)
    say "nginx ($mps MPS) ready after $(python3 -c "print(round($t1-$t0,2))") s; $(grep -h 'gpu: using' "$d/logs/error.log" | head -1)"
    for m in f32 t32 f16; do
        echo -n "model $m: " >&2
        check "http://127.0.0.1:8091/v2/models/$m/infer" || say "WRONG answer from model $m"
    done
    if [ "$DRY" != 1 ]; then
        for i in $(seq 1 300); do curl -sf -o /dev/null --max-time 5 -H "Inference-Header-Content-Length: $HLEN" \
            --data-binary @"$W/req.bin" http://127.0.0.1:8091/tt/v2/models/x/infer && break; sleep 0.2; done
    fi
    mem=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';')
    say "GPU memory per process: $mem"
    for m in f32 t32 f16; do
        best=0
        for c in $CONNS; do
            read -r rps p50 p99 bad <<<"$(run_wrk "http://127.0.0.1:8091/v2/models/$m/infer" "$c")"
            row "module $m, MPS $mps" "$c" "$rps" "$p50" "$p99" "$bad"
            best=$(python3 -c "print(max($best, $rps))")
        done
        # Half of the peak: connections paced 2 ms apart offer about c * 500 requests/s.
        half=$(python3 -c "print(max(1, int($best / 2 / 500)))")
        read -r rps p50 p99 bad <<<"$(run_wrk "http://127.0.0.1:8091/v2/models/$m/infer" "$half" 2)"
        row "module $m, MPS $mps, half load" "$half (2 ms pace)" "$rps" "$p50" "$p99" "$bad"
    done
    if [ "$DRY" != 1 ]; then
        for c in $CONNS; do
            read -r rps p50 p99 bad <<<"$(run_wrk "http://127.0.0.1:8091/tt/v2/models/x/infer" "$c")"
            row "two-tier (aiohttp + PyTorch fp32), MPS $mps" "$c" "$rps" "$p50" "$p99" "$bad"
        done
    fi
    stop_all
    if [ "$mps" = on ]; then echo quit | nvidia-cuda-mps-control; MPS_STARTED=0; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
done

# The CPU path, briefly (an exact float64 scan of the whole index per query).
d=$W/n-cpu
UP=""
conf "$d" 8092 "gpu_model f32 knn $W/index.npy k=$K batch_rows=1024;"
CUDA_VISIBLE_DEVICES="" "$NGINX" -p "$d" -c conf/nginx.conf || exit 1
sleep 1
check http://127.0.0.1:8092/v2/models/f32/infer || say "WRONG answer from the CPU path"
read -r rps p50 p99 bad <<<"$(run_wrk http://127.0.0.1:8092/v2/models/f32/infer 16)"
row "module CPU path (no device)" 16 "$rps" "$p50" "$p99" "$bad"
stop_all

# PyTorch in-process, the same index shape, at the batch sizes the module formed.
TORCH=""
if [ "$DRY" != 1 ] && [ -f "$ROOT/bench/knn_torch.py" ]; then
    TORCH=$(python3 "$ROOT/bench/knn_torch.py" --n "$N" --d "$D" --k "$K" 2>&1 | tee "$OUTDIR/knn-torch.log")
fi

{
    echo "# knn benchmark: N=$N D=$D k=$K, $WORKERS workers, wrk ${SECS}s per row"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
    echo
    echo "| setup | connections | queries/s | p50 ms | p99 ms | errors |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    [ -n "$TORCH" ] && { echo "PyTorch in-process:"; echo "$TORCH"; }
} | tee "$OUTDIR/knn-table.md"
