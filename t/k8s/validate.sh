#!/usr/bin/env bash
# Validates docker/k8s/ (part of make check): every manifest against the Kubernetes JSON
# schemas of the oldest and newest versions checked (strict: unknown fields fail too), with
# kubernetes-validate from PyPI (t/ops-venv.sh) run without network where a network
# namespace of its own can be made; then t/k8s/check.py, what the schemas cannot see (the
# pieces agreeing with each other and with the module). Negative tests first: copies
# broken on purpose must fail each check, so that a check that passes everything fails here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(sh t/ops-venv.sh)
KV=$(dirname "$PY")/kubernetes-validate
VERSIONS="1.29.0 1.37.0"
K8S=docker/k8s
FILES=("$K8S"/configmap.yaml "$K8S"/deployment.yaml "$K8S"/service.yaml "$K8S"/hpa.yaml
    "$K8S"/prometheus-adapter/rules-configmap.yaml)

# No network: the schemas are in the package. unshare -rn (a user and network namespace)
# where the kernel allows it; elsewhere the same run with the network there.
OFFLINE=()
if unshare -rn true 2>/dev/null; then OFFLINE=(unshare -rn); fi

validate() { # FILE...: quiet unless it fails
    local v
    for v in $VERSIONS; do
        "${OFFLINE[@]}" "$KV" --strict --quiet -k "$v" "$@" || return 1
    done
}

W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
passed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { echo "K8S VALIDATION FAILED: $*"; exit 1; }

# Each mutation must make the schema check fail.
broken() { # NAME SED-SCRIPT FILE
    sed "$2" "$3" >"$W/$1.yaml"
    cmp -s "$3" "$W/$1.yaml" && fail "negative test $1: the edit did not apply"
    if validate "$W/$1.yaml" >"$W/out" 2>&1; then fail "negative test $1 passed validation"; fi
    pass "rejected ($1): $(grep -m1 -o 'did not validate.*' "$W/out" | cut -c1-110)"
}
broken wrong-type 's/^  replicas: 1$/  replicas: "one"/' "$K8S"/deployment.yaml
broken unknown-field 's/^          readinessProbe:$/          readynessProbe:/' "$K8S"/deployment.yaml
broken hpa-pods-metric 's/^        metric:$/        metrics:/' "$K8S"/hpa.yaml

validate "${FILES[@]}" >"$W/out" 2>&1 || { cat "$W/out"; fail "the manifests do not validate"; }
pass "${#FILES[@]} manifests valid against Kubernetes ${VERSIONS// /, } (strict${OFFLINE:+, no network})"

# Each mutation must make the consistency check fail.
semantic() { # NAME FILE SED-SCRIPT
    rm -rf "$W/k8s"
    cp -r "$K8S" "$W/k8s"
    sed -i "$3" "$W/k8s/$2"
    cmp -s "$K8S/$2" "$W/k8s/$2" && fail "negative test $1: the edit did not apply"
    if "$PY" t/k8s/check.py "$W/k8s" >"$W/out" 2>&1; then fail "negative test $1 passed the check"; fi
    pass "rejected ($1): $(head -n1 "$W/out" | cut -c1-110)"
}
semantic readiness-path deployment.yaml 's|path: /health/ready|path: /health|'
semantic no-gpu deployment.yaml 's|nvidia.com/gpu: 1|nvidia.com/gpu: 0|'
semantic hpa-metric hpa.yaml 's|name: nv_inference_pending_request_count|name: nv_inference_queue_depth|'
semantic adapter-rule prometheus-adapter/values.yaml 's|by (<<.GroupBy>>)|by (pod)|'
semantic no-metrics-location configmap.yaml 's|gpu_metrics;|return 204;|'
semantic no-mps-env configmap.yaml '/env CUDA_MPS_PIPE_DIRECTORY;/d'

"$PY" t/k8s/check.py "$K8S" || fail "t/k8s/check.py"
pass "the manifests agree with each other, with the module's series and with its endpoints"

# The ConfigMap's nginx.conf through nginx -t with the module built here, paths moved under
# a temp prefix (as the image test does with the image's config). Only with a module that
# has the endpoint directives (gpu_metrics and gpu_health come with the metrics work).
NGINX=${NGX_GPU_NGINX:-$(find target/release/build -path '*/out/objs/nginx' -type f 2>/dev/null | head -n1)}
MODULE=${NGX_GPU_MODULE:-target/release/libngx_http_gpu_module.so}
if [ -x "$NGINX" ] && [ -f "$MODULE" ] && grep -qa gpu_health "$MODULE" && grep -qa gpu_metrics "$MODULE"; then
    P=$W/prefix
    mkdir -p "$P/conf" "$P/modules" "$P/body" "$P/logs"
    ln -s "$(realpath "$MODULE")" "$P/modules/ngx_http_gpu_module.so"
    if [ "$(id -u)" = 0 ]; then user="nobody $(id -gn nobody)"; else user="$(id -un) $(id -gn)"; fi
    "$PY" - "$K8S/configmap.yaml" "$P" "$user" >"$P/conf/nginx.conf" <<'PYEOF' || fail "the ConfigMap's nginx.conf: a path to move is missing"
import sys, yaml
conf = yaml.safe_load(open(sys.argv[1]))["data"]["nginx.conf"]
p, user = sys.argv[2], sys.argv[3]
for old, new in (("pid /run/nginx.pid;", f"pid {p}/nginx.pid;"), ("user nginx nginx;", f"user {user};"),
                 ("client_body_temp_path /var/cache/nginx/client_body;", f"client_body_temp_path {p}/body;")):
    if old not in conf:
        sys.exit(1)
    conf = conf.replace(old, new)
print(conf)
PYEOF
    "$NGINX" -t -p "$P/" -c conf/nginx.conf >"$W/out" 2>&1 || { cat "$W/out"; fail "nginx -t with the ConfigMap's nginx.conf"; }
    grep -E '\[(emerg|alert|crit|error)\]' "$W/out" && fail "nginx -t with the ConfigMap's nginx.conf"
    pass "nginx -t with the ConfigMap's nginx.conf and the module built here"
else
    echo "skipped: nginx -t with the ConfigMap's nginx.conf (no nginx and module built here with gpu_metrics and gpu_health)"
fi
echo "k8s: $passed passed, 0 failed"
