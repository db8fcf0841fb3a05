#!/usr/bin/env python3
"""Builds the search example's index with the module itself: posts corpus.txt to an
embeddings endpoint (the OpenAI API that `gpu_process embeddings <model>;` serves) and
writes index.npy (float32 [lines, dim]) and ids.npy (int64 [lines]: each line's number,
from 1) beside the corpus.

    # nginx serving nginx-conf/search-embed.conf (the same model under /v1/embeddings):
    nginx -p "$prefix" -c conf/search-embed.conf
    python3 nginx-conf/search/build-index.py --url http://127.0.0.1:8081/v1/embeddings
    nginx -p "$prefix" -c conf/search-embed.conf -s stop

Python's standard library only. Empty lines are refused (each line is one document).
"""

import argparse
import base64
import json
import os
import struct
import sys
import urllib.request


def npy(path, descr, shape, data):
    """Writes a version 1.0 .npy file of C-order `data` (bytes)."""
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (descr, dims)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path + ".tmp", "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        f.write(data)
    os.replace(path + ".tmp", path)


def embed(url, model, texts):
    """The embeddings of `texts`, in order, as lists of floats."""
    body = json.dumps({"input": texts, "model": model, "encoding_format": "base64"})
    req = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        sys.exit("%s answered %d: %s" % (url, e.code, e.read().decode(errors="replace")))
    data = sorted(answer["data"], key=lambda d: d["index"])
    if [d["index"] for d in data] != list(range(len(texts))):
        sys.exit("%s answered %d embeddings for %d texts" % (url, len(data), len(texts)))
    out = []
    for d in data:
        e = d["embedding"]
        if isinstance(e, str):
            raw = base64.b64decode(e)
            e = list(struct.unpack("<%df" % (len(raw) // 4), raw))
        out.append(e)
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8081/v1/embeddings")
    p.add_argument("--model", default="minilm", help="the model name sent in requests")
    p.add_argument("--corpus", default=os.path.join(here, "corpus.txt"))
    p.add_argument("--out", default=here, help="where index.npy and ids.npy go")
    p.add_argument("--batch", type=int, default=64, help="texts per request")
    a = p.parse_args()

    with open(a.corpus, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            sys.exit("%s:%d: an empty line" % (a.corpus, i + 1))
    vectors = []
    for at in range(0, len(lines), a.batch):
        vectors.extend(embed(a.url, a.model, lines[at : at + a.batch]))
    dim = len(vectors[0])
    if any(len(v) != dim for v in vectors):
        sys.exit("embeddings of different lengths")
    rows = b"".join(struct.pack("<%df" % dim, *v) for v in vectors)
    npy(os.path.join(a.out, "index.npy"), "<f4", (len(vectors), dim), rows)
    ids = struct.pack("<%dq" % len(lines), *range(1, len(lines) + 1))
    npy(os.path.join(a.out, "ids.npy"), "<i8", (len(lines),), ids)
    print("%d lines, %d dimensions: %s" % (len(lines), dim, os.path.join(a.out, "index.npy")))


if __name__ == "__main__":
    main()
