"""The monitoring profile without Docker (part of make check): docker/compose.yaml, the
Prometheus config and Grafana's provisioning parse and fit together (services in the
monitoring profile, mounted files present, Prometheus scraping gpu_metrics on the nginx
service, the dashboard's datasource uid provisioned), and every series the dashboard
queries, with every label it filters or groups by, is one gpu_metrics serves
(t/metric_names.py). A self-test first: a dashboard broken on purpose must fail.
Usage: check.py [REPO_ROOT]; exits 1 with one line per problem."""

import copy
import json
import os
import re
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import metric_names  # noqa: E402

# PromQL words that are not series: aggregations, functions, keywords.
NOT_SERIES = {
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset", "rate", "irate", "increase", "delta", "idelta",
    "histogram_quantile", "label_values", "abs", "clamp_min", "clamp_max", "time", "vector",
    "scalar", "inf", "nan",
}


def labels_of(expr):
    """Label names a query filters, groups or formats by."""
    out = set()
    for block in re.findall(r"\{([^{}]*)\}", expr):
        out |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", block))
    for block in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        out |= {x.strip() for x in block.split(",") if x.strip()}
    return out


def series_of(expr):
    """Series names a PromQL query reads (label_values(SERIES, LABEL) included)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # strings
    e = re.sub(r"\{[^{}]*\}", "", e)                        # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)                             # Grafana variables
    names = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in NOT_SERIES or re.fullmatch(r"\d.*|e\d+", word):
            continue
        names.add(word)
    lv = re.match(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)", expr)
    if lv:
        names = {lv.group(1)}
    return names


def check_dashboard(dash, problems, where="dashboard"):
    known = metric_names.series()
    exprs = []
    for p in dash.get("panels", []):
        for sub in [p] + p.get("panels", []):
            if sub.get("type") != "row" and not sub.get("targets"):
                problems.append(f"{where}: panel '{sub.get('title')}' queries nothing")
            for t in sub.get("targets", []):
                exprs.append((sub.get("title"), t["expr"], t.get("legendFormat", "")))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"\s*label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", q or "")
        if not m:
            problems.append(f"{where}: variable {v.get('name')}: not label_values(SERIES, LABEL): {q}")
            continue
        exprs.append((f"variable {v['name']}", q, "{{" + m.group(2) + "}}"))
    if not exprs:
        problems.append(f"{where}: no queries")
    for title, expr, legend in exprs:
        names = series_of(expr)
        if not names:
            problems.append(f"{where}: '{title}': no series in {expr}")
        allowed = set()
        for n in names:
            if n not in known:
                problems.append(f"{where}: '{title}': {n} is not a series gpu_metrics serves")
            else:
                allowed |= known[n]
        if names <= known.keys():
            used = labels_of(expr) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            for label in sorted(used - allowed):
                problems.append(f"{where}: '{title}': label {label} is not on {sorted(names)}")
        for reason in re.findall(r'reason\s*=~?\s*"([^"]*)"', expr):
            if reason not in metric_names.FAILURE_REASONS:
                problems.append(f"{where}: '{title}': reason \"{reason}\" is not one gpu_metrics uses")
    return exprs


def main(root):
    problems = []
    d = os.path.join(root, "docker")
    compose = yaml.safe_load(open(os.path.join(d, "compose.yaml")))
    services = compose["services"]
    nginx = services.get("nginx-gpu", {})
    if "profiles" in nginx:
        problems.append("compose: nginx-gpu must start without a profile")
    for name in ("prometheus", "grafana"):
        s = services.get(name)
        if not s:
            problems.append(f"compose: no service {name}")
            continue
        if s.get("profiles") != ["monitoring"]:
            problems.append(f"compose: {name} is not in the monitoring profile: {s.get('profiles')}")
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                if not os.path.exists(os.path.join(d, src)):
                    problems.append(f"compose: {name} mounts {src}, which does not exist")

    def mounted(service, target):
        for v in services.get(service, {}).get("volumes", []):
            parts = v.split(":")
            if parts[1] == target:
                return os.path.join(d, parts[0])
        problems.append(f"compose: {service} mounts nothing at {target}")
        return None

    prom_file = mounted("prometheus", "/etc/prometheus/prometheus.yml")
    if prom_file:
        prom = yaml.safe_load(open(prom_file))
        targets = [(job.get("metrics_path", "/metrics"), t)
                   for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
                   for t in sc["targets"]]
        if ("/metrics", "nginx-gpu:8080") not in targets:
            problems.append(f"prometheus.yml does not scrape nginx-gpu:8080/metrics: {targets}")
    prov = mounted("grafana", "/etc/grafana/provisioning")
    dashdir = mounted("grafana", "/var/lib/grafana/dashboards")
    uids = set()
    if prov:
        for f in sorted(os.listdir(os.path.join(prov, "datasources"))):
            for ds in yaml.safe_load(open(os.path.join(prov, "datasources", f)))["datasources"]:
                uids.add(ds["uid"])
                if ds["type"] != "prometheus" or ds["url"] != "http://prometheus:9090":
                    problems.append(f"datasource {ds['uid']}: not the compose Prometheus: {ds['url']}")
        for f in sorted(os.listdir(os.path.join(prov, "dashboards"))):
            for p in yaml.safe_load(open(os.path.join(prov, "dashboards", f)))["providers"]:
                if p["options"]["path"] != "/var/lib/grafana/dashboards":
                    problems.append(f"dashboard provider {p['name']} reads {p['options']['path']}")
    dashboards = sorted(f for f in os.listdir(dashdir) if f.endswith(".json")) if dashdir else []
    if not dashboards:
        problems.append("no dashboard")
    count = 0
    for f in dashboards:
        dash = json.load(open(os.path.join(dashdir, f)))
        for p in dash["panels"]:
            for t in [p] + p.get("targets", []):
                uid = (t.get("datasource") or {}).get("uid")
                if uid and uid not in uids:
                    problems.append(f"{f}: '{p.get('title')}' uses datasource {uid}, not provisioned")
        count += len(check_dashboard(dash, problems, f))
        # Self-test: the same dashboard with one series misspelt, one label wrong (the
        # per-device breakdown's too), one reason unknown, must each fail.
        for old, new in (("nv_inference_request_success", "nv_inference_request_sucess"),
                         ("by (model, location)", "by (model, op)"),
                         ("sum by (device)", "sum by (gpu)"),
                         ("ngx_gpu_batch_size_bucket", "ngx_gpu_batch_sizes_bucket")):
            bad = json.loads(json.dumps(dash).replace(old, new))
            if bad == dash:
                problems.append(f"self-test: '{old}' is not in {f}")
                continue
            found = []
            check_dashboard(bad, found)
            if not found:
                problems.append(f"self-test: {f} with {old} -> {new} passed the check")
        bad = copy.deepcopy(dash)
        bad["panels"][1]["targets"][1]["expr"] += ' + on() nv_inference_request_failure{reason="gone"}'
        found = []
        check_dashboard(bad, found)
        if not found:
            problems.append("self-test: an unknown failure reason passed the check")
    # What Prometheus scrapes is the image's config (compose mounts docker/conf): it must
    # serve gpu_metrics at /metrics. Said, not failed, until the endpoints are in that config.
    conf = open(os.path.join(d, "conf", "nginx.conf")).read()
    if not re.search(r"location\s*=\s*/metrics\s*\{[^}]*gpu_metrics\s*;", conf):
        print("note: docker/conf/nginx.conf has no `location = /metrics { gpu_metrics; }` yet: "
              "Prometheus will find nothing to scrape")
    return problems, len(dashboards), count


if __name__ == "__main__":
    problems, n, count = main(sys.argv[1] if len(sys.argv) > 1 else ".")
    for p in problems:
        print(f"monitoring check: {p}")
    if problems:
        sys.exit(1)
    print(f"monitoring: compose profile, Prometheus and Grafana provisioning fit; {n} dashboard, "
          f"{count} queries, every series and label one gpu_metrics serves (self-test: 5 broken copies rejected)")
