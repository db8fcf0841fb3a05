#!/usr/bin/env bash
# The run on several GPUs (issue 13), on a machine with 2 or more, from the repository root
# with .gpu/ carried (make gpu-bundle builds it here):
#
#   bash t/gpu/multi.sh          the GPU test suite with every GPU visible, then the benchmark
#   bash t/gpu/multi.sh tests    the test suite only (.gpu/run.sh tests)
#   bash t/gpu/multi.sh bench    the benchmark only
#
# The benchmark: 1 KiB bodies, `echo` and `blake3` (and `return 200`, the host's own
# ceiling), wrk closed loop, against one nginx with `gpu_devices 0` and W workers, then one
# with `gpu_devices all` and W x GPUs workers: the same workers (and connections) per
# device. Both without MPS and, where nvidia-cuda-mps-control exists, with a private MPS
# daemon of this script's own (its own pipe and log directories, stopped at the end). Before
# each measurement it checks every worker's start line (its device, `MPS: on|off` as the run
# asked), that answers come from every device (`$gpu_device`, over fresh connections, which
# `reuseport` spreads over the workers) and that they are right. Prints one table and the
# scaling ratios (all GPUs / one GPU) last; writes it and every wrk output under $OUT (or
# bench/out/).
#
# Knobs: MULTI_SECS (per run, default 5), MULTI_WORKERS_PER_GPU (W, default 4),
# MULTI_CONNS_PER_WORKER (default 64), MULTI_GPUS (default: what CUDA_VISIBLE_DEVICES or
# nvidia-smi lists), MULTI_MPS ("off on" by default; "off" alone skips MPS),
# MULTI_SERVER_CPUS / MULTI_CLIENT_CPUS (taskset lists; default: the first half of the
# cores for nginx, the second half for wrk), MULTI_DRY=1 (no GPU: runs the script on the
# CPU path, checks nothing about devices; for trying the script itself).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
G=$ROOT/.gpu
OUTDIR=${OUT:-$ROOT/bench/out}
mkdir -p "$OUTDIR"
what=${1:-all}
export LD_LIBRARY_PATH=$G/lib:${LD_LIBRARY_PATH:-}
DRY=${MULTI_DRY:-0}
# Every answer from a GPU: a worker without one answers 503, which the runs count.
FALLBACK=off
[ "$DRY" = 1 ] && FALLBACK=cpu
status=0

[ -x "$G/bin/nginx" ] && [ -f "$G/ngx_http_gpu_module.so" ] || {
    echo "no .gpu/ bundle: run 'make gpu-bundle' where the code is built, and carry .gpu/"
    exit 1
}

if [ -n "${MULTI_GPUS:-}" ]; then
    NGPU=$MULTI_GPUS
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
elif [ "$DRY" = 1 ]; then
    NGPU=2
else
    NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c .)
fi
if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id --format=csv,noheader \
        | tee "$OUTDIR/multi-gpus.txt"
    if [ "${NGPU:-0}" -lt 2 ]; then
        echo "multi.sh needs 2 or more GPUs; this machine shows ${NGPU:-0}"
        exit 2
    fi
fi
echo "GPUs: $NGPU"

summary=""
if [ "$what" = all ] || [ "$what" = tests ]; then
    # Every GPU visible: the suites' two workers take gpu0 and gpu1, and t/devices.rs
    # checks the spread on the test device.
    start=$SECONDS
    bash "$G/run.sh" tests | tail -n 20
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
    summary+="GPU test suite with $NGPU GPUs visible: rc=$rc ($((SECONDS - start))s; $OUTDIR/tests.log)"$'\n'
fi
if [ "$what" = tests ]; then
    echo "$summary"
    exit $status
fi

SECS=${MULTI_SECS:-5}
WPG=${MULTI_WORKERS_PER_GPU:-4}
CPW=${MULTI_CONNS_PER_WORKER:-64}
NCPU=$(nproc)
HALF=$((NCPU / 2))
SRV_CPUS=${MULTI_SERVER_CPUS:-0-$((HALF - 1))}
CLI_CPUS=${MULTI_CLIENT_CPUS:-$HALF-$((NCPU - 1))}
CLI_N=$(taskset -c "$CLI_CPUS" nproc)
MODES=${MULTI_MPS:-off on}
command -v nvidia-cuda-mps-control >/dev/null || { [ "$MODES" != off ] && echo "no nvidia-cuda-mps-control: MPS runs skipped"; MODES=off; }
[ "$DRY" = 1 ] && MODES=off
WRK=$G/bin/wrk
NGINX=$G/bin/nginx
W=$(mktemp -d /tmp/ngx-gpu-multi.XXXXXX)
chmod 755 "$W"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
LOG=$OUTDIR/multi-wrk.log
SERVERS=$OUTDIR/multi-servers.log
: >"$LOG"
: >"$SERVERS"
MPS_DIR=""
SMI_PID=""
cleanup() {
    [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
    for d in "$W"/*/; do [ -f "$d/logs/nginx.pid" ] && "$NGINX" -p "$d" -s quit 2>/dev/null; done
    stop_mps
    rm -rf "$W"
}
start_mps() { # a private MPS control daemon, its own pipe and log directories
    MPS_DIR=$W/mps
    mkdir -p "$MPS_DIR/pipe" "$MPS_DIR/log"
    chmod -R 755 "$MPS_DIR"
    CUDA_MPS_PIPE_DIRECTORY=$MPS_DIR/pipe CUDA_MPS_LOG_DIRECTORY=$MPS_DIR/log nvidia-cuda-mps-control -d
}
stop_mps() {
    [ -n "$MPS_DIR" ] || return 0
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$MPS_DIR/pipe nvidia-cuda-mps-control 2>/dev/null
    cat "$MPS_DIR"/log/*.log >>"$SERVERS" 2>/dev/null
    MPS_DIR=""
    sleep 1
}
trap cleanup EXIT
say() { echo "== $*" >&2; }

head -c 1024 /dev/urandom >"$W/body"

conf() { # dir port workers devices
    mkdir -p "$1"/conf "$1"/logs "$1"/modules
    cp "$G/ngx_http_gpu_module.so" "$1/modules/"
    # Workers run as root where nginx does: a root MPS daemon serves only root's clients
    # (or its own user's).
    local user=""
    [ "$(id -u)" = 0 ] && user="user root;"
    cat >"$1/conf/nginx.conf" <<EOF
load_module modules/ngx_http_gpu_module.so;
worker_processes $3;
$user
error_log logs/error.log notice;
pid logs/nginx.pid;
env CUDA_VISIBLE_DEVICES;
env CUDA_MPS_PIPE_DIRECTORY;
env CUDA_MPS_LOG_DIRECTORY;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 10000000;
    gpu_devices $4;
    server {
        listen 127.0.0.1:$2 backlog=4096 reuseport;
        add_header X-Device \$gpu_device;
        location = /ret { return 200 "ok\n"; }
        location = /echo { gpu_process echo; gpu_fallback $FALLBACK; }
        location = /blake3 { gpu_process blake3; gpu_fallback $FALLBACK; }
    }
}
EOF
}

# Starts nginx in $1 and waits for every worker's start line; checks devices and MPS.
# Prints nothing on success; a reason on failure.
start_nginx() { # dir workers devices-expected mps
    local d=$1 n=$2 ndev=$3 mps=$4
    taskset -c "$SRV_CPUS" "$NGINX" -p "$d" -c conf/nginx.conf || { echo "nginx did not start"; return 1; }
    local i lines
    for i in $(seq 1 300); do
        lines=$(grep -cE "gpu: (using gpu|no usable GPU)" "$d/logs/error.log")
        [ "$lines" -ge "$n" ] && break
        sleep 0.2
    done
    [ "$lines" -ge "$n" ] || { echo "only $lines of $n workers said where they run"; return 1; }
    [ "$DRY" = 1 ] && return 0
    grep -q "no usable GPU" "$d/logs/error.log" && { grep "no usable GPU" "$d/logs/error.log" | head -n 3; return 1; }
    # W workers on each device, each saying MPS as the run asked.
    local per
    per=$(grep -o "gpu: using gpu[0-9]*" "$d/logs/error.log" | sort | uniq -c | awk '{print $1}' | sort -u)
    [ "$(grep -o "gpu: using gpu[0-9]*" "$d/logs/error.log" | sort -u | wc -l)" = "$ndev" ] && [ "$per" = "$WPG" ] \
        || { echo "workers per device: $(grep -o "gpu: using gpu[0-9]*" "$d/logs/error.log" | sort | uniq -c | tr '\n' ' ')"; return 1; }
    [ "$(grep "gpu: using gpu" "$d/logs/error.log" | grep -vc ", MPS: $mps\$")" = 0 ] \
        || { echo "a start line does not end in MPS: $mps:"; grep "gpu: using gpu" "$d/logs/error.log" | head -n 3; return 1; }
}

# Answers right, and from every device: fresh connections until each was seen. Sets
# BLAKE_REF (the first run's digest; every later one must agree) and SEEN; call it
# without $(...), so that they stay set.
check_answers() { # port devices
    local port=$1 ndev=$2 i dev seen="" ref
    ref=$(curl -sf --data-binary @"$W/body" "http://127.0.0.1:$port/blake3") || { echo "blake3 failed"; return 1; }
    [ -n "${BLAKE_REF:-}" ] && [ "$ref" != "$BLAKE_REF" ] && { echo "blake3 differs between runs: $ref vs $BLAKE_REF"; return 1; }
    BLAKE_REF=$ref
    for i in $(seq 1 400); do
        curl -sf -D "$W/h" --data-binary @"$W/body" "http://127.0.0.1:$port/echo" -o "$W/out" || { echo "echo failed"; return 1; }
        cmp -s "$W/body" "$W/out" || { echo "echo answered wrong"; return 1; }
        dev=$(tr -d '\r' <"$W/h" | awk -F': ' 'tolower($1)=="x-device"{print $2}')
        [ "$(curl -sf --data-binary @"$W/body" "http://127.0.0.1:$port/blake3")" = "$ref" ] || { echo "blake3 answered wrong on $dev"; return 1; }
        case " $seen " in *" $dev "*) ;; *) seen="$seen $dev" ;; esac
        [ "$(echo $seen | wc -w)" -ge "$ndev" ] && break
    done
    SEEN=$seen
    [ "$DRY" = 1 ] && return 0
    [ "$(echo $seen | wc -w)" = "$ndev" ] || { echo "answers came from$seen, not from $ndev devices"; return 1; }
}

run_wrk() { # url conns -> requests/s
    local c=$2 t
    t=$((c < CLI_N ? c : CLI_N))
    local out
    out=$(taskset -c "$CLI_CPUS" "$WRK" -t"$t" -c"$c" -d"${SECS}s" --timeout 10s -s "$ROOT/bench/post.lua" "$1" -- "$W/body" 2>&1)
    { echo "### $1 conns=$c threads=$t"; echo "$out"; } >>"$LOG"
    local rps bad
    rps=$(echo "$out" | awk '/Requests\/sec:/{print $2}')
    bad=$(echo "$out" | awk '/Non-2xx or 3xx responses:/{print $5}')
    [ -n "$bad" ] && say "$1: $bad non-2xx answers"
    echo "${rps:-0}"
}

RES=$W/results
: >"$RES"
port=8090
for mode in $MODES; do
    if [ "$mode" = on ]; then
        start_mps || { echo "the MPS daemon did not start"; status=1; continue; }
        export CUDA_MPS_PIPE_DIRECTORY=$MPS_DIR/pipe CUDA_MPS_LOG_DIRECTORY=$MPS_DIR/log
    else
        # Somewhere no daemon listens: off, even where the machine runs one of its own.
        mkdir -p "$W/no-mps"
        export CUDA_MPS_PIPE_DIRECTORY=$W/no-mps CUDA_MPS_LOG_DIRECTORY=$W/no-mps
    fi
    for cfg in one all; do
        if [ $cfg = one ]; then n=$WPG; devs=0; ndev=1; else n=$((WPG * NGPU)); devs=all; ndev=$NGPU; fi
        port=$((port + 1))
        d=$W/$mode-$cfg
        conf "$d" "$port" "$n" "$devs"
        why=$(start_nginx "$d" "$n" "$ndev" "$mode")
        if [ -n "$why" ]; then
            echo "WRONG: $mode/$cfg: $why"; status=1
        else
            SEEN=""
            check_answers "$port" "$ndev" >"$W/why" || { echo "WRONG: $mode/$cfg: $(cat "$W/why")"; status=1; }
            say "MPS $mode, gpu_devices $devs, $n workers: start lines and answers checked (devices seen:$SEEN)"
            # Without MPS, one warning per device shared by several workers; none with it.
            mps_warn=$(grep -c "without MPS" "$d/logs/error.log")
            want=0
            [ "$mode" = off ] && [ "$WPG" -gt 1 ] && want=$ndev
            if [ "$DRY" != 1 ] && [ "$mps_warn" != "$want" ]; then
                echo "WRONG: $mode/$cfg: $mps_warn without-MPS warnings, expected $want"; status=1
            fi
            conns=$((CPW * n))
            run_wrk "http://127.0.0.1:$port/echo" "$conns" >/dev/null   # warm-up
            for op in ret echo blake3; do
                if [ $op = echo ] && [ "$DRY" != 1 ]; then
                    nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits -lms 250 >"$W/smi" 2>/dev/null &
                    SMI_PID=$!
                fi
                rps=$(run_wrk "http://127.0.0.1:$port/$op" "$conns")
                if [ -n "$SMI_PID" ]; then
                    kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=""
                    util=$(awk -F', ' '{s[$1]+=$2; c[$1]++} END {for (g = 0; g in s; g++) printf "gpu%s:%.0f%% ", g, s[g]/c[g]}' "$W/smi")
                else
                    util=""
                fi
                echo "$mode $cfg $op $n $conns $rps $mps_warn $util" >>"$RES"
                say "MPS $mode, $cfg: $op $rps req/s ($n workers, $conns connections) $util"
            done
        fi
        "$NGINX" -p "$d" -s quit 2>/dev/null
        for i in $(seq 1 100); do [ -f "$d/logs/nginx.pid" ] || break; sleep 0.1; done
        { echo "######## MPS $mode, $cfg"; cat "$d/logs/error.log"; } >>"$SERVERS"
    done
    [ "$mode" = on ] && stop_mps
done

{
    echo "## Several GPUs: $NGPU GPUs, $WPG workers and $((WPG * CPW)) connections per GPU, 1 KiB bodies, wrk ${SECS} s per run"
    echo
    echo "nginx on cores $SRV_CPUS, wrk on cores $CLI_CPUS ($NCPU in all). Requests/s:"
    echo
    echo "| MPS | op | 1 GPU | $NGPU GPUs | scaling | GPU busy during echo ($NGPU GPUs) |"
    echo "|---|---|---|---|---|---|"
    for mode in $MODES; do
        for op in ret echo blake3; do
            one=$(awk -v m="$mode" -v o="$op" '$1==m && $2=="one" && $3==o {print $6}' "$RES")
            all=$(awk -v m="$mode" -v o="$op" '$1==m && $2=="all" && $3==o {print $6}' "$RES")
            util=$(awk -v m="$mode" -v o="$op" '$1==m && $2=="all" && $3==o {for (i=8; i<=NF; i++) printf "%s ", $i}' "$RES")
            ratio=$(awk -v a="${all:-0}" -v b="${one:-0}" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}')
            label=$op
            [ $op = ret ] && label='`return 200` (the host)'
            printf '| %s | %s | %.0f | %.0f | %s | %s |\n' "$mode" "$label" "${one:-0}" "${all:-0}" "$ratio" "$util"
        done
    done
    echo
    echo "Goal (issue 13): >= 1.8x with 2 GPUs, >= 3.5x with 4, for batched ops at the same workers per GPU."
    echo "Where \`return 200\` scales less than that, the host (cores, wrk), not the GPUs, is the limit."
    awk '{print "- MPS " $1 ", " $2 " (" $4 " workers): the without-MPS warning was logged " $7 " time(s)"}' "$RES" | sort -u
    echo
    printf '%s' "$summary"
} | tee "$OUTDIR/multi-results.md"
exit $status
