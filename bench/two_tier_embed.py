#!/usr/bin/env python3
"""The two-tier embedding peer for bench/embed.sh: an aiohttp service running
sentence-transformers (fp16, on the GPU) behind nginx's proxy_pass, one process per nginx
worker, answering the OpenAI embeddings API (`POST /v1/embeddings`) one request at a time,
the way such a service is usually written.

With --fake it is the dry run's stand-in instead (no torch, no model): random unit vectors
of 384 and a word count for usage, also at `POST /search` ({"input", "k"} -> ids and
scores), to try bench/embed.sh's plumbing where there is no GPU and no embeddings op yet;
without aiohttp it serves with the standard library's threading HTTP server.

Usage: two_tier_embed.py PORT [MODEL_DIR] [--fake]
"""

import argparse
import json
import random
import sys


def answer(vectors, tokens, model):
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def fake_embed(texts):
    out = []
    for t in texts:
        r = random.Random(t)
        v = [r.gauss(0, 1) for _ in range(384)]
        n = sum(x * x for x in v) ** 0.5
        out.append([x / n for x in v])
    return out, sum(len(t.split()) + 2 for t in texts)


def fake_search(req):
    texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
    k = int(req.get("k", 10))
    data = [{"index": i, "ids": list(range(k)), "scores": [1.0 - j / k for j in range(k)]} for i in range(len(texts))]
    t = sum(len(x.split()) + 2 for x in texts)
    return {"object": "list", "data": data, "model": "minilm", "usage": {"prompt_tokens": t, "total_tokens": t}}


def make_embed(model_dir):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cuda")
    model.half()
    model.eval()

    # What model.encode() does for one batch, tokenizing once so usage costs nothing extra.
    def embed(texts):
        features = model.tokenize(texts)
        tokens = int(features["attention_mask"].sum())
        # sentence-transformers 6 adds non-tensor entries (the texts) beside the tensors.
        features = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in features.items()}
        with torch.inference_mode():
            v = model(features)["sentence_embedding"].float().cpu().numpy()
        return v.tolist(), tokens

    embed(["warm up"])
    torch.cuda.synchronize()
    return embed


def serve_aiohttp(port, embed, fake):
    from aiohttp import web

    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def embeddings(request):
        req = json.loads(await request.read())
        texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
        vectors, tokens = embed(texts)
        return web.json_response(answer(vectors, tokens, req.get("model", "minilm")))

    async def search(request):
        return web.json_response(fake_search(json.loads(await request.read())))

    app.router.add_post("/v1/embeddings", embeddings)
    if fake:
        app.router.add_post("/search", search)
    app.router.add_get("/health", lambda r: web.Response(text="ok\n"))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda *x: print(*x, file=sys.stderr))


def serve_stdlib(port, embed):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply({"ok": True})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path.startswith("/search"):
                return self.reply(fake_search(req))
            texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
            vectors, tokens = embed(texts)
            self.reply(answer(vectors, tokens, req.get("model", "minilm")))

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("model", nargs="?")
    p.add_argument("--fake", action="store_true")
    a = p.parse_args()
    embed = fake_embed if a.fake else make_embed(a.model)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        if not a.fake:
            raise
        return serve_stdlib(a.port, embed)
    serve_aiohttp(a.port, embed, a.fake)


if __name__ == "__main__":
    main()
