#!/bin/sh
# Builds what bench/embed.sh needs on the GPU machine into .gpu-bench/ (about 52 MB, under
# one run's carry of 64 MiB): bin/nginx, the module, bin/wrk, the shared libraries they need
# there (lib/), and all-MiniLM-L6-v2 with its weights as float16 (45 MB, made by
# t/embed/gpu-bundle.sh; the float32 file is 91 MB). Then, with the device tool:
#
#   bash bench/embed.sh     from the repository root, carry [".gpu-bench"], as root
#
#   sh bench/embed-bundle.sh
set -eu
cd "$(dirname "$0")/.."
root=$PWD
dest=$root/.gpu-bench
nice cargo build --release
rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/lib"
cp "$(ls -td target/release/build/nginx-sys-*/out/objs/nginx | head -n1)" "$dest/bin/nginx"
cp target/release/libngx_http_gpu_module.so "$dest/ngx_http_gpu_module.so"
cp "$(command -v wrk)" "$dest/bin/wrk"
for l in libpcre2-8.so.0 libcrypt.so.1 libluajit-5.1.so.2; do cp -L "/lib/x86_64-linux-gnu/$l" "$dest/lib/"; done
strip "$dest/ngx_http_gpu_module.so" "$dest/bin/nginx" 2>/dev/null || true
# The float16 model: from .gpu-embed/ where t/embed/gpu-bundle.sh already made it, else made
# now in a scratch directory (it also builds the embed tests' binary there; not carried).
if [ ! -f "$root/.gpu-embed/all-MiniLM-L6-v2/model.safetensors" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sh t/embed/gpu-bundle.sh "$tmp" >&2
    cp -r "$tmp/.gpu-embed/all-MiniLM-L6-v2" "$dest/"
else
    cp -r "$root/.gpu-embed/all-MiniLM-L6-v2" "$dest/"
fi
# sentence-transformers (the peers) reads the tokenizer's and its own small settings too.
src=$root/$(sh t/embed/fetch-model.sh)
for f in tokenizer_config.json special_tokens_map.json config_sentence_transformers.json; do
    [ -f "$src/$f" ] && cp "$src/$f" "$dest/all-MiniLM-L6-v2/"
done
du -sh "$dest"
