# Sourced by the GPU machine's scripts (t/gpu/mps.sh, t/gpu/share.sh): pass/fail counting and
# stopping the nginx they started ($master, its pid).
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
master=
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
