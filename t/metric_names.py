"""The Prometheus series gpu_metrics serves, as fixed for every part of the project (the
module, the dashboard, the Kubernetes autoscaler): what the operator checks
(t/monitoring/check.py, t/k8s/check.py) hold queries and rules against."""

COUNTERS = {
    "nv_inference_request_success": {"model", "location", "device"},
    "nv_inference_request_failure": {"model", "location", "device", "reason"},
    "nv_inference_count": {"model", "location", "device"},
    "nv_inference_exec_count": {"model", "location", "device"},
    "nv_inference_request_duration_us": {"model", "location", "device"},
    "nv_inference_queue_duration_us": {"model", "location", "device"},
    "nv_inference_compute_infer_duration_us": {"model", "location", "device"},
    "ngx_gpu_request_bytes_total": {"model", "location", "device"},
    "ngx_gpu_response_bytes_total": {"model", "location", "device"},
}
HISTOGRAMS = {
    "ngx_gpu_request_duration_seconds": {"model", "location", "device"},
    "ngx_gpu_queue_duration_seconds": {"model", "location", "device"},
    "ngx_gpu_compute_duration_seconds": {"model", "location", "device"},
    "ngx_gpu_batch_size": {"model", "location", "device"},
}
GAUGES = {
    "nv_inference_pending_request_count": {"model", "location", "device"},
    "nv_gpu_memory_used_bytes": {"device", "gpu_uuid"},
    "nv_gpu_memory_total_bytes": {"device", "gpu_uuid"},
    "nv_gpu_utilization": {"device", "gpu_uuid"},
    "nv_gpu_power_usage": {"device", "gpu_uuid"},
    "ngx_gpu_worker_ready": {"worker"},
}
# The per-location series carry `device`: "gpuN" (as $gpu_device names it) for what the
# workers on that device counted, "cpu" for what workers counted while they had no device
# open. Summed over `device`, they are the location's totals.
FAILURE_REASONS = {"bad_request", "queue_full", "unavailable", "timeout", "internal"}

# Labels Prometheus itself adds to every scraped series (compose: job, instance; Kubernetes
# pod scrape jobs: namespace, pod).
SCRAPE_LABELS = {"job", "instance", "namespace", "pod"}


def series():
    """Every series name a query may use, with the labels it carries: the histograms'
    _bucket (with le), _sum and _count."""
    out = {}
    for name, labels in {**COUNTERS, **GAUGES}.items():
        out[name] = labels | SCRAPE_LABELS
    for name, labels in HISTOGRAMS.items():
        out[name + "_bucket"] = labels | {"le"} | SCRAPE_LABELS
        out[name + "_sum"] = labels | SCRAPE_LABELS
        out[name + "_count"] = labels | SCRAPE_LABELS
    return out
