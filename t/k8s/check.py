"""What the Kubernetes schemas cannot see in docker/k8s/: that the pieces agree with each other
and with the module (probes on the endpoints the ConfigMap's nginx.conf serves, the GPU asked
of the device plugin, scrape annotations on the port and path of gpu_metrics, the autoscaler
on a series the module serves and the adapter's rule maps). Usage: check.py K8S_DIR; exits 1
with one line per problem. Run by t/k8s/validate.sh."""

import os
import re
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import metric_names  # noqa: E402

problems = []


def need(cond, what):
    if not cond:
        problems.append(what)
    return cond


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def locations(conf):
    """location = PATH { BODY } pairs of an nginx config (flat bodies, as the ConfigMap's)."""
    return {m.group(1): m.group(2) for m in
            re.finditer(r"location\s*=\s*(\S+)\s*\{([^{}]*)\}", conf)}


def main(root):
    objs = {}
    kust = yaml.safe_load(open(os.path.join(root, "kustomization.yaml")))
    listed = set(kust["resources"])
    present = {f for f in os.listdir(root) if f.endswith(".yaml") and f != "kustomization.yaml"}
    need(listed == present, f"kustomization.yaml lists {sorted(listed)}, the folder has {sorted(present)}")
    for f in sorted(present):
        for d in load(os.path.join(root, f)):
            objs[(d["kind"], d["metadata"]["name"])] = d
            need("namespace" not in d["metadata"], f"{f}: namespace set (the manifests are namespace-agnostic)")

    dep = objs.get(("Deployment", "ngx-gpu"))
    svc = objs.get(("Service", "ngx-gpu"))
    hpa = objs.get(("HorizontalPodAutoscaler", "ngx-gpu"))
    if not (need(dep, "no Deployment ngx-gpu") and need(svc, "no Service ngx-gpu")
            and need(hpa, "no HorizontalPodAutoscaler ngx-gpu")):
        return
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    need(ports.get("http") == 8080, f"container port http is {ports.get('http')}, not 8080")
    need(str(c["resources"]["limits"].get("nvidia.com/gpu")) == "1",
         "the container does not ask the device plugin for nvidia.com/gpu: 1")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    need(env.get("NGX_GPU_MPS") in ("on", "auto", None), f"NGX_GPU_MPS={env.get('NGX_GPU_MPS')}")

    def probe(kind):
        p = c.get(kind) or {}
        g = p.get("httpGet") or {}
        port = g.get("port")
        port = ports.get(port, port)
        return g.get("path"), port

    need(probe("readinessProbe") == ("/health/ready", 8080), f"readinessProbe: {probe('readinessProbe')}")
    need(probe("livenessProbe") == ("/health/live", 8080), f"livenessProbe: {probe('livenessProbe')}")
    ann = pod["metadata"].get("annotations", {})
    need(ann.get("prometheus.io/scrape") == "true", "pod annotation prometheus.io/scrape is not \"true\"")
    need(ann.get("prometheus.io/port") == "8080", f"prometheus.io/port: {ann.get('prometheus.io/port')}")
    need(ann.get("prometheus.io/path") == "/metrics", f"prometheus.io/path: {ann.get('prometheus.io/path')}")
    labels = pod["metadata"]["labels"]
    need(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the Deployment's selector misses its pods")
    need(svc["spec"]["selector"].items() <= labels.items(), "the Service's selector misses the pods")
    need(all(p["targetPort"] in ports or p["targetPort"] in ports.values() for p in svc["spec"]["ports"]),
         "a Service targetPort is not a container port")

    # The config the pods run: mounted from the ConfigMap, serving what the probes and the
    # scrape ask for, and keeping MPS's variables for the workers.
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    conf_vol = [n for n, v in vols.items() if "configMap" in v]
    if need(len(conf_vol) == 1, "no ConfigMap volume"):
        cm_name = vols[conf_vol[0]]["configMap"]["name"]
        m = mounts.get(conf_vol[0], {})
        need(m.get("mountPath") == "/usr/local/nginx/conf/nginx.conf" and m.get("subPath") == "nginx.conf",
             f"the ConfigMap is not mounted as the image's conf/nginx.conf: {m}")
        cm = objs.get(("ConfigMap", cm_name))
        if need(cm and "nginx.conf" in cm.get("data", {}), f"no ConfigMap {cm_name} with nginx.conf"):
            conf = cm["data"]["nginx.conf"]
            locs = locations(conf)
            for path, directive in (("/metrics", r"gpu_metrics\s*;"), ("/health/live", r"gpu_health\s+live\s*;"),
                                    ("/health/ready", r"gpu_health\s+ready\s*;"), ("/status", r"gpu_status\s*;")):
                need(path in locs and re.search(directive, locs[path]),
                     f"nginx.conf: location = {path} lacks {directive.replace(chr(92) + 's*', '').replace(chr(92) + 's+', ' ')}")
            for v in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
                need(re.search(rf"^\s*env\s+{v}\s*;", conf, re.M), f"nginx.conf does not keep {v} (env)")
            need(re.search(r"^\s*listen\s+8080\s*;", conf, re.M), "nginx.conf does not listen on 8080")
            need(re.search(r"^\s*daemon\s+off\s*;", conf, re.M), "nginx.conf lacks daemon off;")
    need(any(m.get("mountPath") == "/run/ngx-gpu" for m in mounts.values()),
         "no volume for the MPS directories (/run/ngx-gpu)")

    # The autoscaler: on the Deployment, a Pods metric the module serves and the adapter maps.
    ref = hpa["spec"]["scaleTargetRef"]
    need((ref["kind"], ref["name"]) == ("Deployment", "ngx-gpu"), f"the HPA scales {ref}")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    need(pods_metrics == ["nv_inference_pending_request_count"], f"the HPA's Pods metrics: {pods_metrics}")
    need(all(m in metric_names.GAUGES for m in pods_metrics), "the HPA's metric is not a gauge the module serves")

    adapter = os.path.join(root, "prometheus-adapter")
    cms = load(os.path.join(adapter, "rules-configmap.yaml"))
    rules = yaml.safe_load(cms[0]["data"]["config.yaml"])["rules"]
    values = yaml.safe_load(open(os.path.join(adapter, "values.yaml")))
    need(values["rules"]["custom"] == rules, "prometheus-adapter/values.yaml and rules-configmap.yaml differ")
    served = set()
    for r in rules:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)
        need(series in metric_names.series(), f"the adapter's rule reads {series}, which the module does not serve")
        need(re.search(r["name"]["matches"], series),
             f"the rule's name.matches does not match {series}")
        need(r["resources"]["overrides"].get("pod", {}).get("resource") == "pod"
             and r["resources"]["overrides"].get("namespace", {}).get("resource") == "namespace",
             "the rule does not map the pod and namespace labels (a Pods metric needs both)")
        need("<<.LabelMatchers>>" in r["metricsQuery"] and "<<.GroupBy>>" in r["metricsQuery"],
             "the rule's metricsQuery must use <<.LabelMatchers>> and group by <<.GroupBy>>")
        served.add(r["name"].get("as") or series)
    need(set(pods_metrics) <= served, f"the adapter serves {sorted(served)}, the HPA asks for {pods_metrics}")


if __name__ == "__main__":
    main(sys.argv[1])
    for p in problems:
        print(f"k8s check: {p}")
    sys.exit(1 if problems else 0)
