#!/usr/bin/env python3
"""PyTorch's in-process exact knn, the reference for the module's knn search benchmark.

`topk(q @ X.T, k)` on the GPU, N x d rows on the device, for fp32 (no TF32), TF32 and
fp16 (rows and queries float16), at batch sizes 1, 16, 128, 1024 (or --batches, for
--precisions): prints queries/s as the
same table the kernel benchmark prints
(`cargo test --release --lib knn_kernel_benchmark -- --ignored --nocapture`).

Usage: knn_torch.py [--n 1000000] [--d 128] [--k 10] [--seconds 0.5]
                   [--batches "1 16 128 1024"] [--precisions "Fp32 Tf32 Fp16"]
"""

import argparse
import time

import torch


def measure(x, q, k, seconds):
    def run(times):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(times):
            torch.topk(q @ x.T, k, dim=1)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(3)
    once = max(run(1), 1e-6)
    times = min(max(int(seconds / once), 3), 2000)
    return q.shape[0] * times / run(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--batches", default="1 16 128 1024")
    ap.add_argument("--precisions", default="Fp32 Tf32 Fp16")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x32 = torch.rand(a.n, a.d, device=dev) * 2 - 1
    batches = [int(b) for b in a.batches.split()]
    rows = []
    for name in a.precisions.split():
        torch.backends.cuda.matmul.allow_tf32 = name == "Tf32"
        dtype = torch.float16 if name == "Fp16" else torch.float32
        x = x32.to(dtype)
        line = f"| {name} |"
        for b in batches:
            q = (torch.rand(b, a.d, device=dev) * 2 - 1).to(dtype)
            qps = measure(x, q, a.k, a.seconds)
            print(f"{name} batch {b}: {qps:.0f} queries/s", flush=True)
            line += f" {qps:.0f} |"
        rows.append(line)
        del x
    torch.backends.cuda.matmul.allow_tf32 = False
    print(
        f"\nPyTorch {torch.__version__} in-process topk(q @ X.T), N = {a.n}, d = {a.d}, "
        f"k = {a.k} ({torch.cuda.get_device_name()})"
    )
    print("| precision |" + "".join(f" batch {b} |" for b in batches))
    print("| --- |" + " --- |" * len(batches))
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
