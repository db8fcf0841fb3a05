#!/usr/bin/env bash
# Runs on the GPU machine (no Docker there), from the repository root, with .gpu-image/
# carried (make gpu-image): starts the image's own nginx and module with the image's own
# config, adapted only where a container differs (a free local port, paths under a
# temp prefix), and checks that both workers took the GPU and that /blake3 and /echo are
# answered correctly by it. No network, no installs: bash, curl, python3 (for a free port).
# Full logs go to $OUT; "gpu-smoke: N passed, N failed" is the last line.
#
# NGX_SMOKE_DEVICE=cpu checks the script itself on a machine without a GPU.
set -u
cd "$(dirname "$0")/../.."
D=$PWD/.gpu-image
OUT=${OUT:-/tmp/gpu-smoke-out}
DEVICE=${NGX_SMOKE_DEVICE:-gpu0}
mkdir -p "$OUT"
[ -x "$D/sbin/nginx" ] || { echo "no $D/sbin/nginx: run make gpu-image where the image is built"; exit 1; }

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
finish() {
    [ -n "${master:-}" ] && kill -0 "$master" 2>/dev/null && kill -TERM "$master"
    cp "$PREFIX"/stderr "$PREFIX"/stdout "$PREFIX/conf/nginx.conf" "$OUT/" 2>/dev/null
    echo "gpu-smoke: $passed passed, $failed failed"
    [ "$failed" = 0 ] && [ "$passed" -gt 0 ]
    exit
}

PREFIX=$(mktemp -d /tmp/ngx-gpu-smoke.XXXXXX)
chmod 755 "$PREFIX"
mkdir -p "$PREFIX/conf" "$PREFIX/modules" "$PREFIX/cuda-cache"
chmod 777 "$PREFIX/cuda-cache"
ln -s "$D/modules/ngx_http_gpu_module.so" "$PREFIX/modules/"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Workers as the image's user where it exists, else nobody: unprivileged either way.
if id nginx >/dev/null 2>&1; then user="nginx nginx"
elif getent group nogroup >/dev/null; then user="nobody nogroup"
else user="nobody"; fi
# Each substitution must hit: a changed image config should fail loudly, not be half-run.
conf=$(cat "$D/conf/nginx.conf")
sub() {
    grep -qF "$1" <<<"$conf" || { bad "the image config has no '$1'"; finish; }
    conf=${conf//"$1"/"$2"}
}
sub "listen 8080;" "listen 127.0.0.1:$PORT;"
sub "pid /run/nginx.pid;" "pid $PREFIX/nginx.pid;"
sub "client_body_temp_path /var/cache/nginx/client_body;" "client_body_temp_path $PREFIX/client_body;"
sub "user nginx nginx;" "user $user;"
printf '%s\n' "$conf" >"$PREFIX/conf/nginx.conf"

export LD_LIBRARY_PATH="$D/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_CACHE_PATH=$PREFIX/cuda-cache
cat "$D/IMAGE-INFO"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -n 2
NGINX=("$D/sbin/nginx" -p "$PREFIX/" -c conf/nginx.conf)

if "${NGINX[@]}" -t >"$PREFIX/nginx-t" 2>&1 && grep -q "test is successful" "$PREFIX/nginx-t"; then
    pass "nginx -t with the image's config (module loaded, kernels compiled)"
else
    cat "$PREFIX/nginx-t"; bad "nginx -t"; finish
fi

"${NGINX[@]}" >"$PREFIX/stdout" 2>"$PREFIX/stderr" &
master=$!
for _ in $(seq 600); do
    [ "$(grep -c 'gpu: ' "$PREFIX/stderr")" -ge 2 ] && break
    kill -0 "$master" 2>/dev/null || { cat "$PREFIX/stderr"; bad "nginx exited at start"; finish; }
    sleep 0.1
done
grep 'gpu: ' "$PREFIX/stderr"
if [ "$DEVICE" = cpu ]; then want='gpu: no usable GPU in this worker: '; else want="gpu: using $DEVICE "; fi
n=$(grep -c "$want" "$PREFIX/stderr")
[ "$n" = 2 ] && pass "both workers: $want" || bad "expected '$want' from 2 workers, got $n"

url=http://127.0.0.1:$PORT
[ "$(curl -sS "$url/health")" = ok ] && pass "/health" || bad "/health"

B3=$D/bin/b3sum
[ "$("$B3" --no-names </dev/null)" = af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262 ] \
    || bad "b3sum does not give BLAKE3's empty-input vector"
requests=0
ok=1
for size in 0 1 1025 65536 1048577 16777216 67108867; do
    f=$PREFIX/body-$size
    head -c "$size" /dev/urandom >"$f"
    got=$(curl -sS --data-binary @"$f" -w ' %{http_code}' "$url/blake3")
    # 64 hex digits, a newline, then curl's status code.
    [ "$got" = "$("$B3" --no-names "$f")"$'\n'" 200" ] || { ok=0; bad "/blake3 $size bytes: $got"; }
    code=$(curl -sS --data-binary @"$f" -o "$PREFIX/answer" -w '%{http_code}' "$url/echo")
    { [ "$code" = 200 ] && cmp -s "$f" "$PREFIX/answer"; } || { ok=0; bad "/echo $size bytes: $code"; }
    rm -f "$f" "$PREFIX/answer"
    requests=$((requests + 2))
done
[ $ok = 1 ] && pass "/blake3 equals b3sum, /echo returns the body (0 B to 64 MiB)"

sleep 0.3
n=$(grep -cE "\"POST /(blake3|echo) HTTP/1.1\" 200 .* device=$DEVICE " "$PREFIX/stdout")
[ "$n" = "$requests" ] && pass "access log: device=$DEVICE for all $requests op requests" \
    || bad "access log: $n of $requests op requests with device=$DEVICE"
grep 'POST /blake3' "$PREFIX/stdout" | tail -n 1

kill -QUIT "$master"
for _ in $(seq 150); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$master" 2>/dev/null; then bad "nginx did not exit within 15 s of SIGQUIT"
else wait "$master"; rc=$?; master=""
    [ $rc = 0 ] && pass "SIGQUIT: graceful exit" || bad "nginx exited with status $rc"; fi
if grep -E '\[(alert|emerg|crit)\]|exited on signal|panicked' "$PREFIX/stderr"; then
    bad "the error log has failures"
else pass "nothing at crit or above in the error log"; fi
finish
