"""The official OpenAI Python client, unmodified, against `gpu_process embeddings`.

Usage: client.py <host:port> <model name> <golden.json or "-">. With golden.json (the real
all-MiniLM-L6-v2 is served) every vector is checked against sentence-transformers' (cosine
>= 0.9999) and the token counts against the reference tokenizer's; without it (a generated
model), the formats are checked against each other and against unit norm. Prints
"checks passed" at the end.
"""

import json
import sys

import numpy as np
import openai

addr, model, golden_path = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="sk-ignored-by-nginx", max_retries=0)

if golden_path != "-":
    with open(golden_path) as f:
        golden = json.load(f)
    texts = golden["texts"]
else:
    golden = None
    texts = ["", "a", "hello world", "héllo wörld", "日本語", "🍕", "the cat sat on the mat " * 30]


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# The client's default: it asks for base64 and decodes it itself.
default = client.embeddings.create(model=model, input=texts)
floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
for resp in (default, floats):
    assert resp.object == "list", resp.object
    assert resp.model == model, resp.model
    assert len(resp.data) == len(texts), len(resp.data)
    assert [d.index for d in resp.data] == list(range(len(texts)))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens
assert default.usage.prompt_tokens == floats.usage.prompt_tokens
for d, f in zip(default.data, floats.data):
    assert np.array_equal(np.float32(d.embedding), np.float32(f.embedding)), d.index

if golden is not None:
    worst = 1.0
    for i, d in enumerate(default.data):
        c = cosine(d.embedding, golden["embeddings"][i])
        worst = min(worst, c)
        assert c >= 0.9999, (i, texts[i], c)
    want = sum(len(ids) for ids in golden["ids"])
    assert default.usage.prompt_tokens == want, (default.usage.prompt_tokens, want)
    print(f"lowest cosine to sentence-transformers: {worst:.6f}")
else:
    for d in default.data:
        assert abs(np.linalg.norm(np.float64(d.embedding)) - 1.0) < 1e-5, d.index

# One string, and `dimensions` equal to the model's.
dim = len(floats.data[0].embedding)
one = client.embeddings.create(model=model, input=texts[2], dimensions=dim)
assert len(one.data) == 1
assert cosine(one.data[0].embedding, floats.data[2].embedding) >= 0.99999

# Errors come back as the client's own exceptions.
try:
    client.embeddings.create(model="text-embedding-3-small", input="x")
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as e:
    assert e.status_code == 404
    assert e.code == "model_not_found", e.code
try:
    client.embeddings.create(model=model, input=[])
    raise AssertionError("an empty input was served")
except openai.BadRequestError as e:
    assert e.status_code == 400
    assert e.param == "input", e.param
try:
    client.embeddings.create(model=model, input="x", dimensions=dim + 1)
    raise AssertionError("other dimensions were served")
except openai.BadRequestError as e:
    assert e.param == "dimensions", e.param

print(f"openai {openai.__version__}: {len(texts)} texts, {dim} dimensions: checks passed")
