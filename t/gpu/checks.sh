# Sourced by the GPU machine's scripts (t/gpu/mps.sh, t/gpu/share.sh), from the repository
# root: the bundle's paths (use_bundle), pass/fail counting and stopping the nginx they
# started ($master, its pid).
# use_bundle OUT_DEFAULT: ROOT, G (.gpu/, from make gpu-bundle), OUT (made), LD_LIBRARY_PATH.
use_bundle() {
    ROOT=$PWD
    G=$ROOT/.gpu
    OUT=${OUT:-$1}
    mkdir -p "$OUT"
    [ -x "$G/bin/nginx" ] || { echo "no $G/bin/nginx: run make gpu-bundle where it is built"; exit 1; }
    export LD_LIBRARY_PATH="$G/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
master=
# write_conf WORKERS HTTP_LINES LOCATIONS: $W/nginx.conf, nginx in the foreground as
# $user:$group on 127.0.0.1:$PORT, logs and temp files under $W, the CUDA variables kept.
write_conf() {
    cat >"$W/nginx.conf" <<EOF
load_module $G/ngx_http_gpu_module.so;
daemon off;
error_log $W/error.log notice;
pid $W/nginx.pid;
user $user $group;
worker_processes $1;
env CUDA_VISIBLE_DEVICES;
env CUDA_CACHE_PATH;
env CUDA_MPS_PIPE_DIRECTORY;
env CUDA_MPS_LOG_DIRECTORY;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $W/body;
    $2
    server {
        listen 127.0.0.1:$PORT;
        $3
    }
}
EOF
}
# stop_nginx [SECONDS]: QUIT the master, KILL it (and count a failure) after SECONDS (15).
stop_nginx() {
    [ -n "$master" ] || return 0
    local limit=${1:-15}
    kill -QUIT "$master" 2>/dev/null
    for _ in $(seq $((limit * 10))); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$master" 2>/dev/null && { bad "nginx did not stop within $limit s"; kill -KILL "$master"; }
    wait "$master" 2>/dev/null
    master=
}
