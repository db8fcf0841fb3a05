#!/usr/bin/env python3
"""sentence-transformers in-process on the GPU (fp16), the in-process peer of bench/embed.sh.

`model.encode(sentences, batch_size=b)` over the benchmark's sentence pool (tokenizing
included, as a service would), for each batch size asked: prints one line per batch size,
"batch B sentences_per_s S", then, with --check, the cosine similarity of the module's
answer (an OpenAI embeddings response for the pool's first sentences) to
sentence-transformers' own embeddings in float32: "check min_cosine C n N".

Usage: embed_torch.py MODEL_DIR SENTENCES.txt --batches 1,32,256 [--seconds 3]
                      [--check ANSWER.json]
"""

import argparse
import json
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer


def rate(model, pool, b, seconds):
    def run(times):
        torch.cuda.synchronize()
        t = time.perf_counter()
        at = 0
        for _ in range(times):
            batch = [pool[(at + i) % len(pool)] for i in range(b)]
            at += b
            model.encode(batch, batch_size=b, convert_to_numpy=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(3)
    once = max(run(2) / 2, 1e-6)
    times = min(max(int(seconds / once), 3), 100000)
    return b * times / run(times)


def check(model_dir, pool, path):
    ans = json.load(open(path))
    got = np.array([d["embedding"] for d in sorted(ans["data"], key=lambda d: d["index"])], dtype=np.float64)
    ref32 = SentenceTransformer(model_dir, device="cuda")
    ref = ref32.encode(pool[: len(got)], convert_to_numpy=True).astype(np.float64)
    del ref32
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"check min_cosine {cos.min():.6f} n {len(got)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("sentences")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--check")
    a = ap.parse_args()
    pool = [s for s in open(a.sentences).read().split("\n") if s]
    if a.check:
        try:
            check(a.model, pool, a.check)
        except Exception as e:  # a wrong answer must not cost the peer's figures
            print(f"checkfail {e!r}"[:300], flush=True)
    model = SentenceTransformer(a.model, device="cuda")
    model.half()
    model.eval()
    for b in sorted({int(x) for x in a.batches.split(",") if x and int(x) > 0}):
        print(f"batch {b} sentences_per_s {rate(model, pool, b, a.seconds):.1f}", flush=True)
    import sentence_transformers

    print(f"# sentence-transformers {sentence_transformers.__version__}, PyTorch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}, fp16", flush=True)


if __name__ == "__main__":
    main()
