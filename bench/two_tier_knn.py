#!/usr/bin/env python3
"""The two-tier peer for vector search (bench/knn.sh): an aiohttp service holding the index
on the GPU with PyTorch and answering the same KServe v2 binary requests the module takes,
one request at a time (`topk(q @ X.T)`), the way such a service is usually written.

Usage: two_tier_knn.py PORT INDEX.npy [--half]
"""

import argparse
import json
import sys

import numpy as np
import torch
from aiohttp import web


def make_app(index_path, half):
    x = torch.from_numpy(np.load(index_path)).cuda()
    if half:
        x = x.half()
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def infer(request):
        body = await request.read()
        hlen = int(request.headers.get("Inference-Header-Content-Length", len(body)))
        head = json.loads(body[:hlen])
        inp = head["inputs"][0]
        n, d = inp["shape"]
        q = torch.frombuffer(bytearray(body[hlen:]), dtype=torch.float32).view(n, d).cuda()
        if half:
            q = q.half()
        k = int(head.get("parameters", {}).get("k", 10))
        scores, ids = torch.topk((q @ x.T).float(), k, dim=1)
        ids_b = ids.cpu().numpy().astype("<i8").tobytes()
        sc_b = scores.cpu().numpy().astype("<f4").tobytes()
        out = {
            "model_name": request.match_info["model"],
            "outputs": [
                {"name": "IDS", "datatype": "INT64", "shape": [n, k],
                 "parameters": {"binary_data_size": len(ids_b)}},
                {"name": "SCORES", "datatype": "FP32", "shape": [n, k],
                 "parameters": {"binary_data_size": len(sc_b)}},
            ],
        }
        h = json.dumps(out).encode()
        return web.Response(body=h + ids_b + sc_b, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(len(h))})

    app.router.add_post("/v2/models/{model}/infer", infer)
    return app


def main():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("index")
    p.add_argument("--half", action="store_true")
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(a.index, a.half), host="127.0.0.1", port=a.port, access_log=None,
                print=lambda *x: print(*x, file=sys.stderr))


if __name__ == "__main__":
    main()
