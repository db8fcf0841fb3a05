#!/usr/bin/env python3
"""The two-tier stack ngx_http_gpu_module replaces, for the benchmark in bench/run.sh.

An aiohttp service (run as many processes as nginx has workers, behind nginx's
proxy_pass with a keepalive upstream) doing the same work as the module's ops on the
GPU, one request at a time, the way such services are usually written:

  POST /echo    the body goes to the GPU with PyTorch, is copied there, and comes back
  POST /blake3  the body goes to the GPU with PyTorch; the digest is computed by the
                module's own CUDA kernels (src/ops/blake3/blake3.cu, compiled with CuPy's
                NVRTC and launched on PyTorch's stream), one launch per tree level

Usage: two_tier.py PORT [--repo DIR] [--device cuda|cpu]
(--device cpu runs echo without torch, to test the harness where there is no GPU).
"""

import argparse
import asyncio
import os
import struct
import sys

from aiohttp import web


def load_blake3(repo):
    import cupy

    src = ""
    for name in (("common.cuh",), ("blake3", "blake3.cu")):
        with open(os.path.join(repo, "src", "ops", *name)) as f:
            # The kernel includes the common header by the name NVRTC serves it under;
            # here the header is pasted in front instead.
            src += f.read().replace('#include "ngx_gpu_common.cuh"', "") + "\n"
    mod = cupy.RawModule(code=src, options=("--std=c++17",))
    return cupy, mod.get_function("blake3_chunks"), mod.get_function("blake3_parents")


def make_app(device, repo):
    app = web.Application(client_max_size=256 * 1024 * 1024)
    torch = None
    if device == "cuda":
        import torch as _torch

        torch = _torch
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # context up front
    b3 = load_blake3(repo) if device == "cuda" else None

    async def echo(request):
        body = await request.read()
        if torch is None:
            return web.Response(body=bytes(body), content_type="application/octet-stream")
        if not body:
            return web.Response(body=b"", content_type="application/octet-stream")
        t = torch.frombuffer(bytearray(body), dtype=torch.uint8).cuda()
        out = t.clone().cpu().numpy().tobytes()
        return web.Response(body=out, content_type="application/octet-stream")

    async def blake3(request):
        body = await request.read()
        if b3 is None:
            return web.Response(status=501, text="no GPU\n")
        cupy, chunks_k, parents_k = b3
        n = len(body)
        n_chunks = max(1, (n + 1023) // 1024)
        # One whole body: data at offset 0, its length, counter base 0, first chunk 0, whole.
        desc = torch.tensor([0, n, 0, 0, 1], dtype=torch.int64).cuda()
        padded = bytearray(body) + b"\0" * 16
        data = torch.frombuffer(padded, dtype=torch.uint8).cuda()
        cv_a = torch.empty(8 * n_chunks, dtype=torch.int32, device="cuda")
        cv_b = torch.empty(8 * n_chunks, dtype=torch.int32, device="cuda")
        out = torch.empty(8, dtype=torch.int32, device="cuda")
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            threads = 256
            blocks = (n_chunks + threads - 1) // threads
            args = (cupy.asarray(desc), cupy.uint32(1), cupy.asarray(data), cupy.uint64(n_chunks),
                    cupy.asarray(cv_a), cupy.asarray(out))
            chunks_k((blocks,), (threads,), args)
            nodes, level = n_chunks, 0
            src, dst = cv_a, cv_b
            while nodes > 1:
                parents_k((blocks,), (threads,), (cupy.asarray(desc), cupy.uint32(1), cupy.uint64(n_chunks),
                                                   cupy.uint32(level), cupy.asarray(src), cupy.asarray(dst),
                                                   cupy.asarray(out)))
                src, dst = dst, src
                nodes = (nodes + 1) // 2
                level += 1
        words = out.cpu().tolist()
        digest = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in words)
        return web.Response(text=digest.hex() + "\n", content_type="text/plain")

    app.router.add_post("/echo", echo)
    app.router.add_post("/blake3", blake3)
    app.router.add_get("/health", lambda r: web.Response(text="ok\n"))
    return app


def main():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--repo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(a.device, a.repo), host="127.0.0.1", port=a.port, access_log=None,
                print=lambda *x: print(*x, file=sys.stderr))


if __name__ == "__main__":
    main()
