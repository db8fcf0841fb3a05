#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with .gpu/ carried (make gpu-bundle):
# every test with NGX_GPU_REQUIRE=1 (GPU-path tests must run, not skip), the fault tests
# with real faulting and hanging kernels, the stress tests with a 60 s reload run, then
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over the kernel tests.
# Full logs go to $OUT (the device tool brings back at most 8 files); a short summary is
# printed last.
#
#   bash .gpu/run.sh            everything
#   bash .gpu/run.sh tests      the test binaries only
#   bash .gpu/run.sh sanitize   compute-sanitizer only
#   bash .gpu/run.sh share      one knn index per GPU shared by the workers (t/gpu/share.sh)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$PWD/.gpu/lib"
export NGX_GPU_REQUIRE=1 NGX_GPU_NGINX=$PWD/.gpu/bin/nginx NGX_GPU_MODULE=$PWD/.gpu/ngx_http_gpu_module.so
export NGX_GPU_FAULT_MODULE=$PWD/.gpu/fault-injection/ngx_http_gpu_module.so
export NGX_GPU_CONF_DIR=$PWD/nginx-conf NGX_GPU_STRESS_SECS=${NGX_GPU_STRESS_SECS:-60}
what=${1:-all}
status=0
summary=""
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/tests.log"

if [ "$what" = all ] || [ "$what" = tests ]; then
    for t in .gpu/bin/test-*; do
        name=$(basename "$t")
        start=$SECONDS
        # The fault and stress suites print their figures (counts, times) as they go.
        case $name in test-faults|test-stress|test-kernels) extra=--nocapture ;; *) extra= ;; esac
        "$t" --test-threads=4 $extra >"$OUT/one.log" 2>&1; rc=$?
        [ $rc -ne 0 ] && status=1
        summary+="$name: $(grep -E '^test result' "$OUT/one.log" | tail -n1) (rc=$rc, $((SECONDS - start))s)"$'\n'
        grep -E "^device: |skipped|largest batch|reloads:|killed:|leaving|against|hung batch|fresh worker|example kernels" "$OUT/one.log" | sort | uniq -c | head -n 8
        { echo "######## $name (rc=$rc)"; cat "$OUT/one.log"; } >>"$OUT/tests.log"
        rm -f "$OUT/one.log"
    done
fi

if [ "$what" = all ] || [ "$what" = sanitize ]; then
    # Every built-in kernel at awkward sizes, through the real GPU thread (src/gpu/tests.rs),
    # once under each tool. NGX_GPU_TEST_SMALL leaves out the 64 MiB body (slow under the
    # tools); bodies up to 5 MiB and pieces of 64 KiB stay.
    CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for tool in memcheck racecheck initcheck synccheck; do
        start=$SECONDS
        extra=()
        [ $tool = memcheck ] && extra=(--leak-check full)
        NGX_GPU_TEST_SMALL=1 "$CS" --tool $tool "${extra[@]}" --error-exitcode 9 \
            .gpu/bin/test-ngx_http_gpu_module gpu::tests --test-threads=1 >"$OUT/one.log" 2>&1
        rc=$?
        [ $rc -ne 0 ] && status=1
        errors=$(grep -E "ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY" "$OUT/one.log" | tr '\n' ' ')
        summary+="compute-sanitizer $tool: rc=$rc, $errors$(grep -E '^test result' "$OUT/one.log" | tail -n1) ($((SECONDS - start))s)"$'\n'
        { echo "######## compute-sanitizer $tool (rc=$rc)"; cat "$OUT/one.log"; } >>"$OUT/sanitizer.log"
        rm -f "$OUT/one.log"
    done
fi
if [ "$what" = all ] || [ "$what" = share ]; then
    # GPU memory against the worker count, with and without MPS; a worker's SIGKILL and a
    # reload under load (its tables are printed as it ends).
    start=$SECONDS
    OUT=$OUT bash t/gpu/share.sh >"$OUT/share.log" 2>&1; rc=$?
    [ $rc -ne 0 ] && status=1
    sed -n '/^GPU memory used by nginx/,$p' "$OUT/share.log"
    summary+="share: $(tail -n1 "$OUT/share.log") (rc=$rc, $((SECONDS - start))s)"$'\n'
fi
echo
echo "$summary"
exit $status
