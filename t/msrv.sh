#!/usr/bin/env bash
# Checks that Cargo.toml's rust-version is at least what every crate in Cargo.lock declares
# (the declared 1.82 was below what libloading 0.9.1 needs: 1.88). Part of `make lint`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
def v(s):
    return tuple(int(x) for x in (s.split(".") + ["0", "0"])[:3])
ours = next(p for p in m["packages"] if p["name"] == "ngx_http_gpu_module")
declared = v(ours["rust_version"])
need = max((v(p["rust_version"]), p["name"] + " " + p["version"])
           for p in m["packages"] if p.get("rust_version") and p is not ours)
if need[0] > declared:
    sys.exit("rust-version %s in Cargo.toml is below %s, which %s needs"
             % (ours["rust_version"], ".".join(map(str, need[0])), need[1]))
print("msrv: rust-version %s covers every locked crate (the most demanding: %s, %s)"
      % (ours["rust_version"], need[1], ".".join(map(str, need[0]))))
'
