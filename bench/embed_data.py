#!/usr/bin/env python3
"""Request bodies and the knn index for the embedding benchmark (bench/embed.sh).

  embed_data.py bodies DIR MODEL_DIR [--n 4096]
      A pool of varied English sentences of about 10-40 tokens (made from word lists with a
      fixed seed, so every run sends the same ones), written as
        DIR/sentences.txt    one sentence a line
        DIR/single.bodies    one OpenAI embeddings request a line, one sentence each
        DIR/batch32.bodies   one request a line, 32 sentences each
        DIR/search.bodies    one /search request a line ({"input": s, "k": 10})
        DIR/check.json       one request of the first 8 sentences (answer checked later)
        DIR/tokens.txt       "mean_tokens min max tokenizer": tokens per sentence counted
                             with the model's own tokenizer, [CLS] and [SEP] included (the
                             `tokenizers` package, else `transformers`; else an estimate,
                             said so in the last field)
  embed_data.py index PATH N D
      N x D random rows of length 1 (float16 .npy), written in slices so that a 1M x 384
      index needs no more than a few hundred MB of memory.
"""

import json
import os
import random
import sys

SUBJECTS = [
    "the engineer", "a small team", "our nightly build", "the new cache layer", "the search service",
    "a patient reviewer", "the storage cluster", "this quarter's budget", "the mobile app",
    "the public library", "a local bakery", "the weather station", "my neighbour's dog",
    "the city council", "an old lighthouse", "the museum's curator", "a freight train",
    "the translation model", "the payment gateway", "the hiking club",
]
VERBS = [
    "reported", "fixed", "measured", "rejected", "published", "rewrote", "delayed", "approved",
    "discovered", "explained", "migrated", "ignored", "repaired", "scheduled", "photographed",
]
OBJECTS = [
    "a memory leak in the request parser", "the results of the latency test", "three new bus routes",
    "the quarterly sales figures", "an unusual pattern in the logs", "the migration plan for Friday",
    "a recipe for sourdough bread with rye flour", "the broken heating system", "a faster index",
    "the draft of the annual report", "an outage that lasted twelve minutes", "the new exhibition",
    "a list of failing integration tests", "the shipment of replacement parts", "the schema change",
]
TAILS = [
    "", "", "", " before the deadline", " after a long discussion with the vendor",
    " although nobody had asked for it", " on a rainy Tuesday morning in November",
    " because the previous attempt had failed twice", " with surprisingly little help",
    " and then wrote a short summary for everyone on the mailing list",
    " while the rest of the office was away at the conference in Lisbon",
    " — in 4.2 seconds, not 9", " (again)", " using only open-source tools",
]
QUESTIONS = [
    "How do I reset my password?", "What is the capital of Australia?",
    "Which trains run to the airport after midnight?", "Why does the build fail on ARM machines?",
    "Can I return shoes that I bought online last month?",
    "What are the side effects of this medication when taken with coffee?",
    "Where can I find the documentation for the embeddings endpoint?",
    "Is the museum open on public holidays, and do children pay?",
]


def sentences(n, seed=11):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        if rng.random() < 0.15:
            out.append(rng.choice(QUESTIONS))
            continue
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."
        if rng.random() < 0.3:
            s += f" {rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} it."
        out.append(s[0].upper() + s[1:])
    return out


def count_tokens(texts, model_dir):
    tok_file = os.path.join(model_dir, "tokenizer.json")
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tok_file)
        tok.no_truncation()
        tok.no_padding()
        return [len(e.ids) for e in tok.encode_batch(texts)], "tokenizers"
    except ImportError:
        pass
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return [len(ids) for ids in tok(texts)["input_ids"]], "transformers"
    except ImportError:
        pass
    # Neither package: words and punctuation marks plus [CLS] and [SEP], an estimate only.
    import re

    return [len(re.findall(r"\w+|[^\w\s]", t)) + 2 for t in texts], "estimate(no-tokenizer-package)"


def bodies(d, model_dir, n):
    os.makedirs(d, exist_ok=True)
    pool = sentences(n)
    with open(os.path.join(d, "sentences.txt"), "w") as f:
        f.write("\n".join(pool) + "\n")
    with open(os.path.join(d, "single.bodies"), "w") as f:
        for s in pool:
            f.write(json.dumps({"input": s, "model": "minilm", "encoding_format": "float"}) + "\n")
    with open(os.path.join(d, "batch32.bodies"), "w") as f:
        for i in range(0, n - 31, 32):
            f.write(json.dumps({"input": pool[i:i + 32], "model": "minilm", "encoding_format": "float"}) + "\n")
    with open(os.path.join(d, "search.bodies"), "w") as f:
        for s in pool:
            f.write(json.dumps({"input": s, "k": 10}) + "\n")
    with open(os.path.join(d, "check.json"), "w") as f:
        json.dump({"input": pool[:8], "model": "minilm", "encoding_format": "float"}, f)
    counts, how = count_tokens(pool, model_dir)
    with open(os.path.join(d, "tokens.txt"), "w") as f:
        f.write(f"{sum(counts) / len(counts):.2f} {min(counts)} {max(counts)} {how}\n")
    with open(os.path.join(d, "check.tokens"), "w") as f:
        f.write(f"{sum(counts[:8])}\n")


def index(path, n, dim):
    import numpy as np

    rng = np.random.default_rng(5)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    step = 100_000
    for i in range(0, n, step):
        x = rng.standard_normal((min(step, n - i), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[i:i + len(x)] = x.astype(np.float16)
    out.flush()


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "bodies":
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 4096
        bodies(sys.argv[2], sys.argv[3], n)
    elif len(sys.argv) == 5 and sys.argv[1] == "index":
        index(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
