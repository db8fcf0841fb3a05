#!/bin/sh
# Puts all-MiniLM-L6-v2 where the embed GPU tests find it on the GPU machine:
# <checkout>/.gpu-embed/all-MiniLM-L6-v2/, with model.safetensors converted to float16
# (45 MB: the float32 file, 91 MB, is more than one run's carry of 64 MiB) and the
# tokenizer and configuration files as they are; and the library's test binary, built
# here and stripped, as .gpu-embed/test-lib (6 MB). Carry .gpu-embed there and run, from
# the checkout's root:
#
#   NGX_GPU_REQUIRE=1 NGX_GPU_REQUIRE_EMBED_MODEL=1 .gpu-embed/test-lib ops::embed --nocapture
#
# The tests take the model from .gpu-embed/ in the directory they run in (or from
# $NGX_GPU_EMBED_MODEL).
#
#   sh t/embed/gpu-bundle.sh [checkout]      (default: this checkout)
set -eu

here=$(cd "$(dirname "$0")/../.." && pwd)
dest=${1:-$here}/.gpu-embed/all-MiniLM-L6-v2
src=$(cd "$here" && sh t/embed/fetch-model.sh)
src=$here/$src
rm -rf "$dest"
mkdir -p "$dest/1_Pooling"
for f in config.json tokenizer.json modules.json sentence_bert_config.json 1_Pooling/config.json; do
    cp "$src/$f" "$dest/$f"
done
python3 - "$src/model.safetensors" "$dest/model.safetensors" <<'PY'
import json, struct, sys
from array import array

src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
out_header, chunks, at = {}, [], 0
for name, t in header.items():
    if name == "__metadata__":
        out_header[name] = t
        continue
    b, e = t["data_offsets"]
    raw = data[b:e]
    if t["dtype"] == "F32":
        v = array("f")
        v.frombytes(raw)
        raw = struct.pack("<%de" % len(v), *v)
        dtype = "F16"
    else:
        dtype = t["dtype"]
    out_header[name] = {"dtype": dtype, "shape": t["shape"], "data_offsets": [at, at + len(raw)]}
    chunks.append(raw)
    at += len(raw)
h = json.dumps(out_header).encode()
h += b" " * (-len(h) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    for c in chunks:
        f.write(c)
PY
exe=$(cd "$here" && cargo test --release --lib --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]]')
cp "$exe" "$dest/../test-lib"
strip "$dest/../test-lib" 2>/dev/null || true
du -sh "$dest/.."
