#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with .gpu/ carried (make gpu-bundle):
# every test with NGX_GPU_REQUIRE=1 (GPU-path tests must run, not skip). The full log
# goes to $OUT/tests.log (one file: the device tool brings back few files); a short
# summary is printed last. The benchmark is bench/run.sh.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$PWD/.gpu/lib"
export NGX_GPU_REQUIRE=1 NGX_GPU_NGINX=$PWD/.gpu/bin/nginx NGX_GPU_MODULE=$PWD/.gpu/ngx_http_gpu_module.so
export NGX_GPU_CONF_DIR=$PWD/nginx-conf
LOG=$OUT/tests.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"
status=0
summary=""
for t in .gpu/bin/test-*; do
    name=$(basename "$t")
    "$t" --test-threads=4 >"$OUT/one.log" 2>&1; rc=$?
    [ $rc -ne 0 ] && status=1
    summary+="$name: $(grep -E '^test result' "$OUT/one.log" | tail -n1) (rc=$rc)"$'\n'
    grep -E "^device: |skipped|largest batch" "$OUT/one.log" | sort | uniq -c | head -n 5
    { echo "######## $name (rc=$rc)"; cat "$OUT/one.log"; } >>"$LOG"
    rm -f "$OUT/one.log"
done
echo
echo "$summary"
exit $status
