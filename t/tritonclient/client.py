"""Triton's own HTTP client (tritonclient[http], unmodified, from PyPI) against nginx's
`gpu_process kserve;`: readiness, metadata, config, infer with binary data on and off,
outputs named and not named, k as a request parameter; every answer checked against a
float64 numpy reference computed here from the model's .npy files.

usage: python client.py HOST:PORT DATA_DIR [EMBED_MODEL]
DATA_DIR holds ip.npy + ids.npy (model "vectors", metric ip, k=5) and l2.npy (model
"near", metric l2, float16). EMBED_MODEL, where given, names an embed model served too
(a generated one: its answers are checked for shape, unit norm, JSON against binary, and
a text in a batch against the same text alone).
"""

import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, data = sys.argv[1], sys.argv[2]
ip_rows = np.load(f"{data}/ip.npy").astype(np.float64)
ids = np.load(f"{data}/ids.npy")
l2_rows = np.load(f"{data}/l2.npy").astype(np.float64)
rng = np.random.default_rng()
checks = 0


def expect(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def reference(rows, q, metric):
    q = q.astype(np.float64)
    if metric == "ip":
        s = q @ rows.T
        order = np.lexsort((np.broadcast_to(np.arange(len(rows)), s.shape), -s), axis=1)
    else:
        s = ((q[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
        order = np.lexsort((np.broadcast_to(np.arange(len(rows)), s.shape), s), axis=1)
    return s, order


def check_hits(rows, q, metric, got_rows, got_scores, k, what):
    s, order = reference(rows, q, metric)
    expect(got_rows.shape == (len(q), k), f"{what}: shape {got_rows.shape}")
    expect(got_scores.dtype == np.float32, f"{what}: scores dtype {got_scores.dtype}")
    for i in range(len(q)):
        want = s[i, order[i, :k]]
        expect(np.allclose(got_scores[i], want, rtol=1e-5, atol=1e-5), f"{what}: scores")
        for j in range(k):
            if got_rows[i, j] != order[i, j]:
                # Another row is right only where its exact score ties.
                expect(abs(s[i, got_rows[i, j]] - want[j]) <= 1e-5, f"{what}: row {j}")


client = httpclient.InferenceServerClient(url=url)
expect(client.is_server_live(), "server live")
expect(client.is_server_ready(), "server ready")
expect(client.is_model_ready("vectors"), "model ready")
expect(not client.is_model_ready("nope"), "unknown model is not ready")
meta = client.get_server_metadata()
expect("binary_tensor_data" in meta["extensions"], f"extensions {meta}")
mm = client.get_model_metadata("vectors")
d = ip_rows.shape[1]
expect(mm["inputs"][0]["name"] == "QUERY" and mm["inputs"][0]["shape"] == [-1, d], f"{mm}")
expect([o["name"] for o in mm["outputs"]] == ["IDS", "SCORES"], f"{mm}")
cfg = client.get_model_config("near")
expect(cfg["name"] == "near", f"{cfg}")

id_to_row = {int(x): i for i, x in enumerate(ids)}
for rows_n in (1, 3):
    for binary_in in (True, False):
        for outs in (None, "both-binary", "both-json", "scores-only"):
            for model, metric, rows, k in (("vectors", "ip", ip_rows, None), ("near", "l2", l2_rows, 7)):
                q = rng.uniform(-1, 1, size=(rows_n, d)).astype(np.float32)
                inp = httpclient.InferInput("QUERY", list(q.shape), "FP32")
                inp.set_data_from_numpy(q, binary_data=binary_in)
                if outs is None:
                    requested = None
                elif outs == "scores-only":
                    requested = [httpclient.InferRequestedOutput("SCORES", binary_data=True)]
                else:
                    b = outs == "both-binary"
                    requested = [
                        httpclient.InferRequestedOutput("IDS", binary_data=b),
                        httpclient.InferRequestedOutput("SCORES", binary_data=b),
                    ]
                params = {"k": k} if k else None
                res = client.infer(model, [inp], outputs=requested, parameters=params, request_id="r7")
                what = f"{model} rows={rows_n} binary_in={binary_in} outputs={outs}"
                want_k = k or 5
                scores = res.as_numpy("SCORES")
                expect(res.get_response()["id"] == "r7", what)
                if outs == "scores-only":
                    expect(res.as_numpy("IDS") is None, f"{what}: IDS not requested")
                    s, order = reference(rows, q, metric)
                    expect(np.allclose(scores, np.take_along_axis(s, order[:, :want_k], 1), rtol=1e-5, atol=1e-5), what)
                    continue
                got = res.as_numpy("IDS")
                if model == "vectors":
                    got = np.vectorize(lambda x: id_to_row[int(x)])(got)
                check_hits(rows, q, metric, got, scores, want_k, what)

# FP16 queries, binary.
q = rng.uniform(-1, 1, size=(2, d)).astype(np.float16)
inp = httpclient.InferInput("QUERY", [2, d], "FP16")
inp.set_data_from_numpy(q)
res = client.infer("near", [inp])
check_hits(l2_rows, q.astype(np.float32), "l2", res.as_numpy("IDS"), res.as_numpy("SCORES"), 10, "fp16 query")

# Errors come back as the client's exception, with the server's message.
try:
    inp = httpclient.InferInput("QUERY", [1, d + 1], "FP32")
    inp.set_data_from_numpy(np.zeros((1, d + 1), np.float32))
    client.infer("vectors", [inp])
    expect(False, "a wrong shape was accepted")
except InferenceServerException as e:
    expect("expected [n, %d]" % d in str(e), f"error text: {e}")
try:
    client.get_model_metadata("nope")
    expect(False, "an unknown model has metadata")
except InferenceServerException as e:
    expect("unknown model" in str(e), f"error text: {e}")

if len(sys.argv) > 3:
    name = sys.argv[3]
    mm = client.get_model_metadata(name)
    expect(mm["inputs"][0] == {"name": "TEXT", "datatype": "BYTES", "shape": [-1]}, f"{mm}")
    dim = mm["outputs"][0]["shape"][1]
    texts = np.array(["hello world".encode(), "héllo wörld".encode(), b"", b"x"], dtype=np.object_)

    def embed(values, binary):
        inp = httpclient.InferInput("TEXT", [len(values)], "BYTES")
        inp.set_data_from_numpy(values, binary_data=binary)
        out = httpclient.InferRequestedOutput("EMBEDDING", binary_data=binary)
        return client.infer(name, [inp], outputs=[out]).as_numpy("EMBEDDING")

    b = embed(texts, True)
    j = embed(texts, False)
    expect(b.shape == (len(texts), dim) and b.dtype == np.float32, f"{b.shape} {b.dtype}")
    expect(np.array_equal(b, j), "binary and JSON embeddings differ")
    norms = np.linalg.norm(b.astype(np.float64), axis=1)
    expect(np.all(np.abs(norms - 1) < 1e-5), f"norms {norms}")
    alone = embed(texts[1:2], True)
    cos = float(alone[0].astype(np.float64) @ b[1].astype(np.float64))
    expect(cos >= 0.999999, f"alone vs in a batch: {cos}")
    expect(float(b[0] @ b[3]) < 0.9999, "different texts, the same vector")
    try:
        client.infer(name, [httpclient.InferInput("TEXT", [1], "FP32")])
        expect(False, "an FP32 TEXT was served")
    except Exception as e:  # the client refuses to send it, or nginx answers 400
        expect("BYTES" in str(e) or "data" in str(e), f"error text: {e}")

# The model repository extension: the declared models, loaded when nginx started.
expect({"model_repository", "statistics"} <= set(meta["extensions"]), f"extensions {meta}")
index = client.get_model_repository_index()
served = {"near", "vectors"} | ({sys.argv[3]} if len(sys.argv) > 3 else set())
expect({m["name"] for m in index} == served, f"index {index}")
expect(all(m["state"] == "READY" and m["version"] == "1" for m in index), f"index {index}")
client.load_model("vectors")  # already loaded: answered as Triton answers it
for call, what in ((lambda: client.load_model("nope"), "load of an unknown model"),
                   (lambda: client.unload_model("vectors"), "unload")):
    try:
        call()
        expect(False, f"{what} was accepted")
    except InferenceServerException as e:
        expect("failed to" in str(e), f"{what}: error text {e}")

# The statistics extension, from the metrics zone: the requests this test sent.
stats = client.get_inference_statistics("vectors")["model_stats"]
expect(len(stats) == 1 and stats[0]["name"] == "vectors", f"stats {stats}")
st = stats[0]["inference_stats"]
expect(int(st["success"]["count"]) == 16, f"vectors successes {st}")
expect(int(st["fail"]["count"]) == 1, f"vectors failures {st}")
expect(int(st["success"]["ns"]) > 0 and int(st["queue"]["count"]) >= 16, f"{st}")
expect(1 <= int(stats[0]["execution_count"]) <= int(stats[0]["inference_count"]), f"{stats}")
expect(int(stats[0]["last_inference"]) > 1.7e12, f"{stats}")
every = client.get_inference_statistics()["model_stats"]
near = [m for m in every if m["name"] == "near"]
expect(len(every) == len(served) and int(near[0]["inference_stats"]["success"]["count"]) == 17, f"{every}")

print(f"tritonclient: {checks} checks passed")
