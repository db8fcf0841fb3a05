#!/usr/bin/env bash
# The embedding benchmark (issue 11, item 6), everything in one device call of under 9 minutes:
#
#   sh bench/embed-bundle.sh   # here: nginx, the module, wrk, libraries and all-MiniLM-L6-v2
#                              # as float16 (45 MB) into .gpu-bench/ (about 52 MB in all)
#   bash bench/embed.sh        # there, as root, from the repository root, carry [".gpu-bench"]
#                              # (the device tool: command "bash bench/embed.sh", carry
#                              # [".gpu-bench"], timeout_s 600; the report comes back in $OUT)
#
# all-MiniLM-L6-v2, nginx with BENCH_WORKERS (4) workers on cores 0-7, wrk on 8-15, a pool of
# 4096 varied English sentences of about 10-40 tokens (bench/embed_data.py; tokens counted
# with the model's tokenizer, [CLS] and [SEP] included) rotated by bench/embed.lua. Measured:
# - the module, `gpu_process embeddings minilm;` at POST /v1/embeddings (OpenAI format,
#   encoding_format float), with a private MPS control daemon (and without, MPS_RUNS): one
#   sentence a request at 1 connection (lone request, idle server), EMBED_CONNS (a few dozen,
#   hundreds), then at half of the measured peak (connections paced 2 ms apart); requests of
#   32 sentences at 1 and BATCH_CONNS connections; the sentences per batch the module formed
#   (nv_inference_exec_count); GPU memory per worker (nvidia-smi --query-compute-apps);
# - search, `gpu_process search minilm idx;` at POST /search over a 1M x 384 float16 index of
#   random unit rows made here with numpy, at SEARCH_CONNS connections (skipped, with a line
#   saying so, where the module does not know the op);
# - the two-tier stack: the same nginx proxying to BENCH_WORKERS aiohttp processes running
#   sentence-transformers fp16 (bench/two_tier_embed.py), same requests and connections;
# - the module's CPU path (no device visible), briefly;
# - sentence-transformers in-process, fp16, batch 1, 32, 256 and the batch sizes the module
#   reached (bench/embed_torch.py), which also checks the module's answer against its own.
# One table, ratios against the peers of the same run, in $OUT/embed-<date>.md (raw wrk output,
# server logs and the peers' output beside it; $OUT defaults to bench/out).
#
# Knobs: BENCH_SECS (4), BENCH_WORKERS (4), EMBED_CONNS ("64 512"), BATCH_CONNS (64), EMBED_SWEEP (below),
# SEARCH_CONNS (256), MPS_RUNS ("on off"; MPS needs root), EMBED_MODEL (.gpu-bench/all-MiniLM-L6-v2),
# INDEX_ROWS (1000000), BENCH_SERVER_CPUS / BENCH_CLIENT_CPUS (0-7 / 8-15); EMBED_OP and
# SEARCH_OP replace the ops' gpu_process arguments (e.g. `echo`, to try the module's side of
# the plumbing in a dry run before the embeddings op exists: its answers are not embeddings);
# EMBED_EXTRA: more http-level directives for the module (e.g. "gpu_batch_tokens 32768;");
# EMBED_LOC_EXTRA: directives in the /v1/embeddings and /search locations (default
# "gpu_batch_size 256;", as nginx-conf/embeddings.conf; gpu_batch_delay stays at its 0);
# BENCH_BUDGET (480): seconds after which the optional parts (the second MPS run, the CPU
# path) are skipped, with a line saying so, to stay inside one device call.
# BENCH_DRY=1: the whole script here on the CPU with tiny durations (nginx and the module from
# target/release, wrk from PATH, the float32 model from t/embed/fetch-model.sh, a 2000-row
# index, no MPS, no taskset); where the module lacks an op, a stand-in (bench/two_tier_embed.py
# --fake) answers in its place, and the two-tier peer is the stand-in too: dry figures test the
# plumbing, they are not measurements.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${OUT:-$ROOT/bench/out}
mkdir -p "$OUTDIR"
DRY=${BENCH_DRY:-0}
SECS=${BENCH_SECS:-4}
WORKERS=${BENCH_WORKERS:-4}
CONNS=${EMBED_CONNS:-"64 512"}
BCONNS=${BATCH_CONNS:-64}
SCONNS=${SEARCH_CONNS:-256}
MPS_RUNS=${MPS_RUNS:-"on off"}
ROWS_N=${INDEX_ROWS:-1000000}
CPU_SECS=$SECS
if [ "$DRY" = 1 ]; then
    G=""
    NGINX=${BENCH_NGINX:-$(ls -td "$ROOT"/target/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n1)}
    MODULE=${BENCH_MODULE:-$ROOT/target/release/libngx_http_gpu_module.so}
    WRK=${BENCH_WRK:-$(command -v wrk)}
    MODEL=${EMBED_MODEL:-$ROOT/$(sh t/embed/fetch-model.sh)}
    SECS=${BENCH_SECS:-2}
    CPU_SECS=$SECS
    CONNS=${EMBED_CONNS:-"8 32"}
    BCONNS=${BATCH_CONNS:-8}
    SCONNS=${SEARCH_CONNS:-8}
    ROWS_N=${INDEX_ROWS:-2000}
    MPS_RUNS=off
    SRV_CPUS=${BENCH_SERVER_CPUS:-}
    CLI_CPUS=${BENCH_CLIENT_CPUS:-}
else
    G=$ROOT/.gpu-bench
    NGINX=${BENCH_NGINX:-$G/bin/nginx}
    MODULE=${BENCH_MODULE:-$G/ngx_http_gpu_module.so}
    WRK=${BENCH_WRK:-$G/bin/wrk}
    MODEL=${EMBED_MODEL:-$G/all-MiniLM-L6-v2}
    CPU_SECS=$(( SECS > 3 ? 3 : SECS ))
    SRV_CPUS=${BENCH_SERVER_CPUS:-0-7}
    CLI_CPUS=${BENCH_CLIENT_CPUS:-8-15}
    export LD_LIBRARY_PATH=$G/lib:${LD_LIBRARY_PATH:-}
    # NVRTC and cuBLAS from PyTorch's wheels where the system has none (the module loads them
    # by name; without them it answers from the CPU path and the table says so).
    for lib in nvrtc:cuda_nvrtc cublas:cublas; do
        ldconfig -p 2>/dev/null | grep -q "lib${lib%%:*}\.so" && continue
        found=0
        for d in ${LD_LIBRARY_PATH//:/ }; do compgen -G "$d/lib${lib%%:*}.so*" >/dev/null && found=1; done
        [ "$found" = 1 ] && continue
        d=$(python3 -c "import os, nvidia.${lib#*:} as m; print(os.path.join(list(m.__path__)[0], 'lib'))" 2>/dev/null) \
            && [ -d "$d" ] && export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH && echo "== lib${lib%%:*} from $d" >&2
    done
fi
for f in "$NGINX" "$MODULE" "$WRK" "$MODEL/tokenizer.json"; do
    [ -f "$f" ] || { echo "missing: $f (sh bench/embed-bundle.sh; for BENCH_DRY=1: cargo build --release)"; exit 1; }
done
SRV=()
CLI=()
[ -n "$SRV_CPUS" ] && SRV=(taskset -c "$SRV_CPUS")
[ -n "$CLI_CPUS" ] && CLI=(taskset -c "$CLI_CPUS")
MAIN=""
[ "$(id -u)" = 0 ] && MAIN="user root;"
DATE=$(date -u +%Y-%m-%d)
REPORT=$OUTDIR/embed-$DATE.md
LOG=$OUTDIR/embed-wrk.log
RAW=$OUTDIR/embed-raw.txt
PEERS=$OUTDIR/embed-peers.log
: >"$LOG"
: >"$RAW"
: >"$PEERS"
W=$(mktemp -d /tmp/ngx-gpu-embed.XXXXXX)
chmod 755 "$W"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
T0=$SECONDS
PIDS=()
SERVERS=()
NOTES=()
say() { echo "== [$((SECONDS - T0))s] $*" >&2; }
note() { NOTES+=("$*"); say "$*"; }
raw() { echo "$*" >>"$RAW"; }

stop_nginx() {
    local s left
    for s in "${SERVERS[@]}"; do
        [ -f "$W/$s/logs/nginx.pid" ] && "$NGINX" -p "$W/$s" -s quit 2>/dev/null
    done
    for _ in $(seq 1 100); do
        left=0
        for s in "${SERVERS[@]}"; do [ -f "$W/$s/logs/nginx.pid" ] && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    SERVERS=()
}
stop_peers() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    PIDS=()
}
mps_quit() {
    [ -d "$W/mps/pipe" ] && CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log \
        sh -c 'echo quit | nvidia-cuda-mps-control' >/dev/null 2>&1
}
cleanup() {
    stop_nginx
    stop_peers
    [ -n "${STANDIN_PID:-}" ] && kill "$STANDIN_PID" 2>/dev/null
    mps_quit
    for f in "$W"/*/logs/error.log "$W"/peer-*.log; do
        [ -f "$f" ] && { echo "######## $f"; cat "$f"; }
    done >"$OUTDIR/embed-servers.log" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

# 1. Sentences, request bodies, token counts; the index.
say "making the sentence pool and the $ROWS_N x 384 index"
python3 "$ROOT/bench/embed_data.py" bodies "$W/data" "$MODEL" || exit 1
python3 "$ROOT/bench/embed_data.py" index "$W/index.npy" "$ROWS_N" 384 || exit 1
read -r TOK_MEAN TOK_MIN TOK_MAX TOK_HOW <"$W/data/tokens.txt"
raw "tokens_per_sentence mean $TOK_MEAN min $TOK_MIN max $TOK_MAX counted_by $TOK_HOW"
say "tokens per sentence: mean $TOK_MEAN, $TOK_MIN to $TOK_MAX ($TOK_HOW)"

# nginx config: name port gpu-lines location-lines
start_nginx() {
    local name=$1 port=$2 models=$3 locs=$4
    shift 4
    mkdir -p "$W/$name"/{conf,logs,modules}
    cp "$MODULE" "$W/$name/modules/ngx_http_gpu_module.so"
    cat >"$W/$name/conf/nginx.conf" <<EOF
load_module modules/ngx_http_gpu_module.so;
worker_processes $WORKERS;
$MAIN
error_log logs/error.log notice;
pid logs/nginx.pid;
env CUDA_VISIBLE_DEVICES;
env CUDA_MPS_PIPE_DIRECTORY;
env CUDA_MPS_LOG_DIRECTORY;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_buffer_size 64k;
    gpu_queue_size 8192;
    ${EMBED_EXTRA:-}
    $models
    upstream two_tier { ${UP:-server 127.0.0.1:1;} keepalive 512; }
    server {
        listen 127.0.0.1:$port backlog=4096;
        add_header X-Device \$gpu_device;
        location = /metrics { gpu_metrics; }
        location /tt/ {
            proxy_pass http://two_tier/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 120s;
        }
        $locs
    }
}
EOF
    env "$@" "${SRV[@]}" "$NGINX" -p "$W/$name" -c conf/nginx.conf || return 1
    SERVERS+=("$name")
}
conf_ok() { # models locs: does nginx -t accept them?
    mkdir -p "$W/t"/{conf,logs,modules}
    cp "$MODULE" "$W/t/modules/ngx_http_gpu_module.so"
    printf 'load_module modules/ngx_http_gpu_module.so;\nerror_log logs/error.log;\nevents {}\nhttp { %s server { listen 127.0.0.1:1; %s } }\n' \
        "$1" "$2" >"$W/t/conf/nginx.conf"
    "$NGINX" -p "$W/t" -c conf/nginx.conf -t >"$W/t/out" 2>&1
    local rc=$?
    rm -f "$W/t/logs/nginx.pid"
    return $rc
}

# wrk URL CONNS BODIES [PACE_MS] -> "rps p50_ms p99_ms errors requests"
run_wrk() {
    local url=$1 c=$2 bodies=$3 pace=${4:-0}
    local t=$((c < 8 ? c : 8))
    local out
    out=$("${CLI[@]}" "$WRK" -t"$t" -c"$c" -d"${RUN_SECS:-$SECS}s" --timeout 30s --latency -s "$ROOT/bench/embed.lua" "$url" \
        -- "$bodies" "$pace" 2>&1)
    { echo "### $url conns=$c bodies=$(basename "$bodies") pace=$pace"; echo "$out"; } >>"$LOG"
    python3 - "$out" <<'EOF'
import re, sys
out = sys.argv[1]
def ms(v, u):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
n = re.search(r"(\d+) requests in", out)
lat = dict((p, ms(v, u)) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M))
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
errs = re.search(r"Socket errors:.*timeout (\d+)", out)
done = int(n.group(1)) if n else 0
if done == 0:  # nothing answered within the run: no latency to speak of
    lat = {}
print(rps.group(1) if rps else "0", round(lat.get("50", float("nan")), 3), round(lat.get("99", float("nan")), 3),
      (int(bad.group(1)) if bad else 0) + (int(errs.group(1)) if errs else 0), done)
EOF
}
# Batches run so far by a location's op (nv_inference_exec_count, summed over workers).
batches() { # port location
    curl -s --max-time 5 "http://127.0.0.1:$1/metrics" \
        | awk -v l="location=\"$2\"" '$1 ~ /^nv_inference_exec_count\{/ && index($1, l) {s += $2} END {print s + 0}'
}
# measure SETUP KIND PORT PATH CONNS [PACE] -> a line in $RAW:
#   row SETUP KIND CONNS PACE rps p50 p99 errors sentences_per_batch
measure() {
    local setup=$1 kind=$2 port=$3 path=$4 c=$5 pace=${6:-0}
    local bodies=$W/data/single.bodies per=1 b0 b1 spb="-"
    case $kind in batch32) bodies=$W/data/batch32.bodies per=32 ;; search) bodies=$W/data/search.bodies ;; esac
    b0=$(batches "$port" "$path")
    read -r rps p50 p99 bad n <<<"$(run_wrk "http://127.0.0.1:$port$path" "$c" "$bodies" "$pace")"
    b1=$(batches "$port" "$path")
    [ "$((b1 - b0))" -gt 0 ] && [ "$n" -gt 0 ] && spb=$(python3 -c "print(round($n * $per / ($b1 - $b0), 1))")
    raw "row $setup $kind $c $pace $rps $p50 $p99 $bad $spb"
    say "$setup $kind c=$c pace=$pace: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $bad, sentences/batch $spb"
    LAST_RPS=$rps
    LAST_P50=$p50
}
# wait_ready PORT PATH WANT: until POST PATH answers 200 from where WANT says (gpu: a
# device; cpu: the CPU path; any: anything, e.g. a stand-in). 0 when so, 2 when it keeps
# answering from the CPU path where a device was wanted (20 s), 1 after 2 minutes.
wait_ready() {
    local got cpu=0
    for _ in $(seq 1 600); do
        got=$(curl -s -o /dev/null -D - --max-time 5 -H 'Content-Type: application/json' \
            --data-binary @"$W/data/check.json" "http://127.0.0.1:$1$2" | tr -d '\r' \
            | awk '/^HTTP/{c=$2} /^X-Device/{d=$2} END {print c, d}')
        case "$3 $got" in
            "any 200"*|"gpu 200 gpu"*|"cpu 200 cpu") return 0 ;;
            "gpu 200 cpu") cpu=$((cpu + 1)); [ "$cpu" -ge 100 ] && return 2 ;;
        esac
        sleep 0.2
    done
    return 1
}
gpu_mem() { # name when: GPU memory of each of its nginx's workers, from nvidia-smi
    local master pids line
    master=$(cat "$W/$1/logs/nginx.pid" 2>/dev/null) || return
    pids=" $(awk -v m="$master" '$4 == m {printf "%s ", $1}' /proc/[0-9]*/stat 2>/dev/null)"
    line=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null \
        | while IFS=', ' read -r pid mem unit; do case "$pids" in *" $pid "*) echo -n "$mem$unit "; esac; done)
    raw "gpu_mem $1 ($2): ${line:-none}"
    raw "gpu_mem_all $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';')"
    say "GPU memory per worker ($1, $2): ${line:-not reported}"
}

# EMBED_SWEEP="WORKERS:SERVER_CPUS:CLIENT_CPUS:POLL ...": instead of the whole benchmark, the
# module alone (MPS on where it can start) with single-sentence requests at EMBED_CONNS for each
# setup (e.g. "4:0-7:8-15:default 8:0-11:12-15:0"; POLL is a gpu_poll value or "default"), to
# find where the host side runs out; one table in $OUT/embed-sweep-<date>.md, the workers'
# per-batch counters (pack, launch calls, GPU, finish) in embed-servers.log.
if [ -n "${EMBED_SWEEP:-}" ]; then
    SWEEP=$OUTDIR/embed-sweep-$DATE.md
    mps=off
    if [ "$DRY" = 0 ] && [ "$(id -u)" = 0 ] && command -v nvidia-cuda-mps-control >/dev/null; then
        mkdir -p "$W/mps/pipe" "$W/mps/log"
        export CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log
        nvidia-cuda-mps-control -d && mps=on && sleep 0.5
    fi
    {
        echo "# Embedding sweep, all-MiniLM-L6-v2 fp16, $DATE ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)), MPS $mps"
        echo
        echo "One sentence a request (mean $TOK_MEAN tokens), wrk ${SECS} s a row, OpenAI float answers."
        echo
        echo "| workers | nginx cpus | wrk cpus | gpu_poll | conns | req/s | p50 ms | p99 ms | errors | sentences/batch |"
        echo "|---|---|---|---|---|---|---|---|---|---|"
    } >"$SWEEP"
    sweep_n=0
    for setup in $EMBED_SWEEP; do
        IFS=: read -r WORKERS SRV_CPUS CLI_CPUS poll <<<"$setup"
        SRV=(taskset -c "$SRV_CPUS")
        CLI=(taskset -c "$CLI_CPUS")
        [ "$DRY" = 1 ] && SRV=() && CLI=()
        extra=${EMBED_EXTRA:-}
        [ "$poll" != default ] && extra="$extra gpu_poll $poll;"
        name=sweep-$sweep_n
        sweep_n=$((sweep_n + 1))
        EMBED_EXTRA=$extra start_nginx "$name" 8401 "gpu_model minilm embed $MODEL precision=fp16;" \
            "location = /v1/embeddings { gpu_process embeddings minilm; gpu_batch_size 256; }" \
            || { note "sweep $setup: nginx did not start"; continue; }
        if ! wait_ready 8401 /v1/embeddings "$([ "$DRY" = 1 ] && echo cpu || echo gpu)"; then
            note "sweep $setup: not ready from the device"
            stop_nginx
            continue
        fi
        for c in $CONNS; do
            measure "sweep $setup" single 8401 /v1/embeddings "$c"
            read -r _ _ _ _ _ _ rps p50 p99 bad spb <<<"$(tail -n1 "$RAW")"
            printf '| %s | %s | %s | %s | %s | %.0f | %s | %s | %s | %s |\n' "$WORKERS" "$SRV_CPUS" "$CLI_CPUS" \
                "$poll" "$c" "$rps" "$p50" "$p99" "$bad" "$spb" >>"$SWEEP"
        done
        stop_nginx
    done
    [ "$mps" = on ] && mps_quit
    for x in "${NOTES[@]}"; do echo "- $x"; done >>"$SWEEP"
    cat "$SWEEP"
    exit 0
fi

# 2. The module (and the two-tier peer behind the same nginx, in the first MPS run).
EMBED_MODELS="gpu_model minilm embed $MODEL precision=fp16;"
SEARCH_MODELS="gpu_model idx knn $W/index.npy metric=ip precision=fp16 k=10 batch_rows=1024;"
LOC_EXTRA=${EMBED_LOC_EXTRA-gpu_batch_size 256;}
EMBED_LOC="location = /v1/embeddings { gpu_process ${EMBED_OP:-embeddings minilm}; $LOC_EXTRA }"
SEARCH_LOC="location = /search { gpu_process ${SEARCH_OP:-search minilm idx}; $LOC_EXTRA }"
[ -n "${EMBED_OP:-}${SEARCH_OP:-}" ] && note "EMBED_OP=${EMBED_OP:-} SEARCH_OP=${SEARCH_OP:-}: the module's rows run those ops, not the embeddings and search ops"
MODULE_OK=1
STANDIN=0
STANDIN_PID=""
WANT=gpu
[ "$DRY" = 1 ] && WANT=cpu
if ! conf_ok "$EMBED_MODELS" "$EMBED_LOC"; then
    why=$(grep -o 'emerg.*' "$W/t/out" | head -n1)
    EMBED_MODELS=""
    SEARCH_MODELS=""
    EMBED_LOC=""
    SEARCH_LOC=""
    if [ "$DRY" = 1 ]; then
        note "the module does not take \`gpu_process embeddings\` ($why): DRY RUN against the stand-in (bench/two_tier_embed.py --fake) in its place"
        STANDIN=1
        WANT=any
        python3 "$ROOT/bench/two_tier_embed.py" 9400 --fake >"$W/peer-standin.log" 2>&1 &
        STANDIN_PID=$!
        px='proxy_pass http://127.0.0.1:9400; proxy_http_version 1.1; proxy_set_header Connection "";'
        EMBED_LOC="location = /v1/embeddings { $px }"
        SEARCH_LOC="location = /search { $px }"
        for _ in $(seq 1 100); do curl -sf -o /dev/null --max-time 2 http://127.0.0.1:9400/health && break; sleep 0.1; done
    else
        note "the module does not take \`gpu_process embeddings\` ($why): no module rows"
        MODULE_OK=0
    fi
fi
SEARCH=$MODULE_OK
if [ "$MODULE_OK" = 1 ] && [ "$STANDIN" = 0 ] && ! conf_ok "$EMBED_MODELS $SEARCH_MODELS" "$EMBED_LOC $SEARCH_LOC"; then
    note "search skipped: the module does not take \`gpu_process search minilm idx\` ($(grep -o 'emerg.*' "$W/t/out" | head -n1))"
    SEARCH=0
    SEARCH_MODELS=""
    SEARCH_LOC=""
fi

# Connections that offer about half of PEAK when each waits 2 ms, then about LONE_P50 ms.
half_conns() { # peak lone_p50
    python3 -c "import math, sys; l = float(sys.argv[2]); print(max(1, round(float(sys.argv[1]) / 2 * (2 + (1 if math.isnan(l) else l)) / 1000)))" "$1" "$2"
}
module_runs() { # name setup
    local name=$1 setup=$2 peak=0 c half lone code
    curl -s --max-time 30 -H 'Content-Type: application/json' --data-binary @"$W/data/check.json" \
        http://127.0.0.1:8401/v1/embeddings -o "$W/answer-$name.json"
    python3 - "$W/answer-$name.json" "$(cat "$W/data/check.tokens")" <<'EOF' 2>&1 | tee -a "$RAW" >&2
import json, sys
try:
    a = json.load(open(sys.argv[1]))
    print("usage_check prompt_tokens", a["usage"]["prompt_tokens"], "ours", sys.argv[2],
          "dim", len(a["data"][0]["embedding"]), "n", len(a["data"]))
except Exception as e:
    print("note the module's answer to 8 sentences is not an embeddings list:", repr(e)[:120],
          open(sys.argv[1], errors="replace").read(200).replace("\n", " "))
EOF
    gpu_mem "$name" "loaded, idle"
    # Warm-up (buffers grow, kernels settle), not measured.
    "${CLI[@]}" "$WRK" -t4 -c64 -d1s -s "$ROOT/bench/embed.lua" http://127.0.0.1:8401/v1/embeddings \
        -- "$W/data/single.bodies" >/dev/null 2>&1
    measure "$setup" single 8401 /v1/embeddings 1
    lone=$LAST_P50
    for c in $CONNS; do
        measure "$setup" single 8401 /v1/embeddings "$c"
        peak=$(python3 -c "print(max($peak, $LAST_RPS))")
    done
    # Half of the peak: each connection waits 2 ms, then about the lone p50 for its answer.
    half=$(half_conns "$peak" "$lone")
    measure "$setup, half load" single 8401 /v1/embeddings "$half" 2
    measure "$setup" batch32 8401 /v1/embeddings 1
    measure "$setup" batch32 8401 /v1/embeddings "$BCONNS"
    if [ "$SEARCH" = 1 ]; then
        code=$(curl -s -o "$W/search.json" -w '%{http_code}' --max-time 30 -H 'Content-Type: application/json' \
            -d '{"input": "How do I reset my password?", "k": 10}' http://127.0.0.1:8401/search)
        raw "search_check $code $(head -c 300 "$W/search.json" | tr '\n' ' ')"
        measure "$setup" search 8401 /search "$SCONNS"
    fi
    gpu_mem "$name" "after the runs"
}
two_tier_runs() { # setup
    local setup=$1 peak=0 c half lone
    "${CLI[@]}" "$WRK" -t4 -c16 -d1s -s "$ROOT/bench/embed.lua" http://127.0.0.1:8401/tt/v1/embeddings \
        -- "$W/data/single.bodies" >/dev/null 2>&1
    measure "$setup" single 8401 /tt/v1/embeddings 1
    lone=$LAST_P50
    for c in $CONNS; do
        measure "$setup" single 8401 /tt/v1/embeddings "$c"
        peak=$(python3 -c "print(max($peak, $LAST_RPS))")
    done
    half=$(half_conns "$peak" "$lone")
    measure "$setup, half load" single 8401 /tt/v1/embeddings "$half" 2
    measure "$setup" batch32 8401 /tt/v1/embeddings 1
    measure "$setup" batch32 8401 /tt/v1/embeddings "$BCONNS"
}

BUDGET=${BENCH_BUDGET:-480}
late() { # what: true (and a note) when the run is past BENCH_BUDGET's share for this part
    [ $((SECONDS - T0)) -lt "$2" ] && return 1
    note "$1 skipped: $((SECONDS - T0)) s into the run (BENCH_BUDGET $BUDGET s)"
}
TWO_TIER_DONE=0
for mps in $MPS_RUNS; do
    ENVS=(-u CUDA_MPS_PIPE_DIRECTORY -u CUDA_MPS_LOG_DIRECTORY)
    [ "$TWO_TIER_DONE" = 1 ] && [ "$MODULE_OK" = 0 ] && continue
    [ "$TWO_TIER_DONE" = 1 ] && late "the module run with MPS $mps" $((BUDGET / 2)) && continue
    if [ "$mps" = on ]; then
        if [ "$(id -u)" != 0 ] || ! command -v nvidia-cuda-mps-control >/dev/null; then
            note "MPS run skipped: it needs root and nvidia-cuda-mps-control"
            continue
        fi
        mkdir -p "$W/mps/pipe" "$W/mps/log"
        export CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log
        nvidia-cuda-mps-control -d || { note "the MPS control daemon did not start: no MPS run"; continue; }
        sleep 0.5
        ENVS=()
    fi
    # Two-tier backends (under the MPS daemon where it runs): once, in the first run.
    UP=""
    if [ "$TWO_TIER_DONE" = 0 ]; then
        for i in $(seq 1 "$WORKERS"); do
            port=$((9400 + i))
            if [ "$DRY" = 1 ]; then
                python3 "$ROOT/bench/two_tier_embed.py" "$port" --fake >"$W/peer-$i.log" 2>&1 &
            else
                env "${ENVS[@]}" "${SRV[@]}" python3 "$ROOT/bench/two_tier_embed.py" "$port" "$MODEL" >"$W/peer-$i.log" 2>&1 &
            fi
            PIDS+=($!)
            UP="$UP server 127.0.0.1:$port;"
        done
        up=0
        for i in $(seq 1 "$WORKERS"); do
            for _ in $(seq 1 600); do
                curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$((9400 + i))/health" && { up=$((up + 1)); break; }
                kill -0 "${PIDS[$((i - 1))]}" 2>/dev/null || break
                sleep 0.2
            done
        done
        say "two-tier backends up: $up of $WORKERS"
        [ "$up" = "$WORKERS" ] || note "two-tier: $up of $WORKERS backends started ($(tail -n1 "$W/peer-1.log"))"
    fi
    name=mod-mps-$mps
    if ! start_nginx "$name" 8401 "$EMBED_MODELS $SEARCH_MODELS" "$EMBED_LOC $SEARCH_LOC" "${ENVS[@]}" 2>"$W/start.err"; then
        note "nginx (MPS $mps) did not start: $(head -c 300 "$W/start.err")"
        stop_peers
        if [ "$mps" = on ]; then mps_quit; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
        continue
    fi
    if [ "$MODULE_OK" = 1 ]; then
        t0=$SECONDS
        wait_ready 8401 /v1/embeddings "$WANT"
        case $? in
            0)
                say "module (MPS $mps) ready after $((SECONDS - t0)) s; $(grep -ho 'gpu: using.*' "$W/$name/logs/error.log" | head -n1)"
                raw "start $name $(grep -ho 'gpu: using.*' "$W/$name/logs/error.log" | head -n1)"
                setup="module, MPS $mps"
                [ "$STANDIN" = 1 ] && setup="STAND-IN for the module (dry run)"
                [ "$DRY" = 1 ] && [ "$STANDIN" = 0 ] && setup="module CPU fallback (dry run)"
                module_runs "$name" "$setup"
                ;;
            2) note "the module (MPS $mps) answers from the CPU path, not a GPU: $(grep -h 'gpu: ' "$W/$name/logs/error.log" | head -n2 | tr '\n' ' ')" ;;
            *) note "the module (MPS $mps) never answered /v1/embeddings: $(grep -h 'emerg\|alert\|crit\|error' "$W/$name/logs/error.log" | head -n2 | tr '\n' ' ')" ;;
        esac
    fi
    if [ "$TWO_TIER_DONE" = 0 ]; then
        tsetup="two-tier (aiohttp + sentence-transformers fp16), MPS $mps"
        [ "$DRY" = 1 ] && tsetup="two-tier STAND-IN (dry run)"
        [ "$up" -gt 0 ] && two_tier_runs "$tsetup"
        TWO_TIER_DONE=1
        stop_peers
        say "two-tier backends stopped"
    fi
    stop_nginx
    say "nginx stopped"
    if [ "$mps" = on ]; then mps_quit; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
done

# 3. The CPU path: no device visible, a short run.
if [ "$MODULE_OK" = 0 ] || [ "$STANDIN" = 1 ]; then
    note "CPU path skipped: no embeddings op in this build"
elif ! late "the CPU path" $((BUDGET * 3 / 4)); then
    UP=""
    if start_nginx cpu 8402 "$EMBED_MODELS" "$EMBED_LOC" -u CUDA_MPS_PIPE_DIRECTORY -u CUDA_MPS_LOG_DIRECTORY CUDA_VISIBLE_DEVICES= \
        && wait_ready 8402 /v1/embeddings cpu; then
        say "CPU path ready"
        RUN_SECS=$CPU_SECS
        measure "module CPU path (no device)" single 8402 /v1/embeddings 1
        measure "module CPU path (no device)" single 8402 /v1/embeddings $((WORKERS * 4))
        measure "module CPU path (no device)" batch32 8402 /v1/embeddings "$WORKERS"
        unset RUN_SECS
    else
        note "the CPU path did not start or answer"
    fi
    stop_nginx
fi
[ -n "$STANDIN_PID" ] && kill "$STANDIN_PID" 2>/dev/null

# 4. sentence-transformers in-process at batch 1, 32, 256 and the sentences per batch the
# module formed (rounded), checking the module's answer against its own embeddings.
if [ "$DRY" = 1 ]; then
    note "in-process sentence-transformers skipped in the dry run (no GPU, no sentence-transformers here)"
else
    extra=$(awk '$1 == "row" && $2 == "module," && $NF != "-" && $NF < 4096 {printf "%d,", $NF + 0.5}' "$RAW")
    check=()
    for a in "$W"/answer-mod-mps-on.json "$W"/answer-mod-mps-off.json; do [ -s "$a" ] && { check=(--check "$a"); break; }; done
    say "sentence-transformers in-process, batches 1,32,256,$extra"
    python3 "$ROOT/bench/embed_torch.py" "$MODEL" "$W/data/sentences.txt" --batches "1,32,256,$extra" \
        --seconds "$(( SECS > 3 ? 3 : SECS ))" "${check[@]}" 2>>"$PEERS" | tee -a "$PEERS" | sed 's/^/inproc /' >>"$RAW"
    grep -q '^inproc batch' "$RAW" || note "in-process sentence-transformers gave no figures: $(grep -v '^\s*$' "$PEERS" | tail -n1)"
fi
raw "device $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
raw "elapsed_s $((SECONDS - T0))"
for n in "${NOTES[@]}"; do raw "note $n"; done

# 5. The table.
python3 - "$RAW" "$WORKERS" "$SECS" "$DRY" "$DATE" <<'EOF' | tee "$REPORT"
import sys
raw, workers, secs, dry, date = sys.argv[1:]
rows, inproc, notes, mem, info = [], {}, [], [], {}
tok = 1.0
for line in open(raw):
    f = line.split()
    if not f:
        continue
    if f[0] == "row":
        # setup words ... kind conns pace rps p50 p99 bad spb  (setup has spaces: parse from the end)
        kind, c, pace, rps, p50, p99, bad, spb = f[-8:]
        rows.append(dict(setup=" ".join(f[1:-8]), kind=kind, c=int(c), pace=float(pace), rps=float(rps),
                         p50=float(p50), p99=float(p99), bad=int(bad), spb=None if spb == "-" else float(spb)))
    elif f[0] == "inproc" and f[1] == "batch":
        inproc[int(f[2])] = float(f[4])
    elif f[0] == "inproc" and f[1] == "check":
        ok = "met" if float(f[3]) >= 0.999 else "NOT met"
        info["check"] = (f"the module's embeddings vs sentence-transformers' (the same fp16 weights, computed in float32): "
                         f"min cosine {f[3]} over {f[5]} sentences (issue 11: >= 0.999 in fp16: {ok})")
    elif f[0] == "inproc" and f[1] == "checkfail":
        notes.append("the check of the module's answer against sentence-transformers failed: " + " ".join(f[2:]))
    elif f[0] == "inproc" and f[1] == "#":
        info["st"] = " ".join(f[2:])
    elif f[0] == "tokens_per_sentence":
        tok = float(f[2])
        info["tok"] = f"tokens per sentence: mean {f[2]}, min {f[4]}, max {f[6]} (counted by {f[8]}, [CLS] and [SEP] included)"
    elif f[0] == "usage_check":
        info.setdefault("usage", []).append(f"the module's usage.prompt_tokens for the first 8 sentences: {f[2]} (our count {f[4]}), dim {f[6]}")
    elif f[0] == "gpu_mem":
        mem.append(f"{f[1]}: {' '.join(f[2:])}")
    elif f[0] == "search_check":
        info.setdefault("search", []).append("search answer (HTTP " + f[1] + "): " + " ".join(f[2:])[:200])
    elif f[0] == "note":
        notes.append(" ".join(f[1:]))
    elif f[0] in ("device", "elapsed_s", "start"):
        info.setdefault(f[0], []).append(" ".join(f[1:]))

def per_req(r):
    return 32 if r["kind"] == "batch32" else 1

def sent(r):
    return r["rps"] * per_req(r)

def twotier(r):
    for t in rows:
        if t["setup"].startswith("two-tier") and t["kind"] == r["kind"] and t["c"] == r["c"] and (t["pace"] > 0) == (r["pace"] > 0):
            return t
    return None

def nearest_inproc(b):
    if not inproc or b is None:
        return None, None
    k = min(inproc, key=lambda x: abs(x - b))
    return k, inproc[k]

out = []
title = f"# Embedding benchmark, all-MiniLM-L6-v2, {date}" + (" (DRY RUN: no GPU, stand-ins; not measurements)" if dry == "1" else "")
out.append(title + "\n")
for d in info.get("device", []):
    out.append(f"Device: {d or 'no GPU'}. nginx {workers} workers, wrk {secs} s per row, one sentence per request unless 'batch32' (32 sentences); OpenAI `POST /v1/embeddings`, encoding_format float.")
if "tok" in info:
    out.append(info["tok"] + ".")
out.append("")
out.append("| setup | request | conns | req/s | sentences/s | tokens/s | p50 ms | p99 ms | errors | sentences/batch | vs two-tier | vs in-process ST (batch) |")
out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    conns = f"{r['c']}" + (f" (paced {r['pace']:g} ms)" if r["pace"] > 0 else "")
    s = sent(r)
    tt = twotier(r) if not r["setup"].startswith("two-tier") else None
    vs_tt = f"{s / sent(tt):.1f}x" if tt and sent(tt) > 0 and r["kind"] != "search" else ""
    vs_ip = ""
    if r["setup"].startswith("module") and r["kind"] != "search" and r["pace"] == 0 and r["c"] > 1:
        b = r["spb"] if r["spb"] else per_req(r)
        k, v = nearest_inproc(b)
        if v:
            vs_ip = f"{s / v:.2f}x ({k})"
    sentences = f"{s:,.0f}" if r["kind"] != "search" else "-"
    tokens = f"{s * tok:,.0f}" if r["kind"] != "search" else "-"
    spb = f"{r['spb']:.1f}" if r["spb"] else "-"
    out.append(f"| {r['setup']} | {r['kind']} | {conns} | {r['rps']:,.0f} | {sentences} | {tokens} | {r['p50']:.3f} | {r['p99']:.3f} | {r['bad']} | {spb} | {vs_tt} | {vs_ip} |")
for b in sorted(inproc):
    out.append(f"| sentence-transformers in-process fp16 | batch {b} | - | - | {inproc[b]:,.0f} | {inproc[b] * tok:,.0f} | - | - | - | {b} | | |")
out.append("")
out.append("'vs two-tier': sentences/s over the two-tier stack's at the same request kind and connections. "
           "'vs in-process ST': sentences/s over sentence-transformers in-process at the batch size nearest to the "
           "sentences per batch the module formed in that row (nv_inference_exec_count). Half-load rows: "
           "connections paced 2 ms apart, offering about half the peak of the rows above.")
out.append("")
if inproc or "st" in info:
    out.append(f"- In-process peer: {info.get('st', 'sentence-transformers')}; encode() with tokenizing, batches taken in turn from the same pool.")
if "check" in info:
    out.append(f"- Check: {info['check']}.")
for u in info.get("usage", []):
    out.append(f"- {u}.")
for s in info.get("start", []):
    if len(s.split()) > 1:
        out.append(f"- Start line ({s.split()[0]}): {s.split(None, 1)[1]}")
for m in mem:
    out.append(f"- GPU memory per worker (nvidia-smi), {m}")
for s in info.get("search", []):
    out.append(f"- {s}")
for n in notes:
    out.append(f"- Note: {n}")

# The issue's goals, from this run.
def best(pred):
    c = [r for r in rows if pred(r)]
    return max(c, key=lambda r: r["rps"]) if c else None
goals = []
mod = lambda r: r["setup"].startswith("module, MPS") and "half" not in r["setup"]
one = best(lambda r: mod(r) and r["kind"] == "single" and r["c"] > 1)
if one:
    goals.append(f"single-sentence requests/s {one['rps']:,.0f} at {one['c']} conns ({one['setup']}, {one['bad']} errors), goal >= 50,000: {'met' if one['rps'] >= 50000 and one['bad'] == 0 else 'NOT met'}")
lone = [r for r in rows if mod(r) and r["kind"] == "single" and r["c"] == 1]
for r in lone:
    goals.append(f"lone request p50 {r['p50']:.3f} ms ({r['setup']}), goal < 1 ms: {'met' if r['p50'] < 1 else 'NOT met'}")
for r in [x for x in rows if mod(x) and x["c"] > 1 and x["kind"] != "search" and "MPS on" in x["setup"]]:
    tt = twotier(r)
    if tt and sent(tt) > 0:
        goals.append(f"{r['kind']} at {r['c']} conns vs two-tier (MPS on) {sent(r) / sent(tt):.1f}x, goal >= 10x: {'met' if sent(r) >= 10 * sent(tt) else 'NOT met'}")
    b = r["spb"] if r["spb"] else per_req(r)
    k, v = nearest_inproc(b)
    if v:
        goals.append(f"{r['kind']} at {r['c']} conns vs in-process ST at batch {k} {sent(r) / v:.2f}x, goal >= 2x: {'met' if sent(r) >= 2 * v else 'NOT met'}")
srch = best(lambda r: r["setup"].startswith("module") and r["kind"] == "search")
if srch:
    goals.append(f"search (embed + 1M x 384 knn) {srch['rps']:,.0f} requests/s at {srch['c']} conns ({srch['bad']} errors), goal >= 20,000: {'met' if srch['rps'] >= 20000 and srch['bad'] == 0 else 'NOT met'}")
if goals and dry != "1":
    out.append("\n## Goals (issue 11)\n")
    out += [f"- {g}" for g in goals]
for e in info.get("elapsed_s", []):
    out.append(f"\nWhole run: {e} s. Beside this file: embed-wrk.log (every wrk output), embed-peers.log, embed-servers.log.")
out.append("\n## Raw numbers (embed-raw.txt)\n")
out.append("Rows: setup, request kind, connections, pace ms, req/s, p50 ms, p99 ms, errors, sentences per batch.\n")
out.append("```")
out += [line.rstrip("\n") for line in open(raw)]
out.append("```")
print("\n".join(out))
EOF
