#!/usr/bin/env bash
# Copies the tested image's own nginx, module and config, and the libraries nginx links
# from the image, into .gpu-image/ (or $1) for the GPU machine, which has no Docker: there
# t/image/gpu-smoke.sh runs them against the GPU. Run after t/image/test.sh (make gpu-image).
#
# glibc and the GCC runtime are not copied: the image's binaries are built on bookworm
# (glibc 2.36) and the GPU machine's Ubuntu 24.04 has a newer glibc, which runs them; its
# libcuda and libnvrtc need that system glibc anyway. The check below fails the export if
# the binaries ever need a newer glibc than NGX_GPU_MAX_GLIBC (2.39, the GPU machine's).
set -euo pipefail
cd "$(dirname "$0")/../.."
. t/image/env.sh
DEST=${1:-.gpu-image}
MAX_GLIBC=${NGX_GPU_MAX_GLIBC:-2.39}

have_image "$IMAGE" || { echo "no image $IMAGE: run t/image/test.sh first" >&2; exit 1; }
command -v objdump >/dev/null || $SUDO apt-get install -y -qq binutils
command -v b3sum >/dev/null || $SUDO apt-get install -y -qq b3sum

ctr=$("${B[@]}" from --pull=never "$IMAGE")
trap '"${B[@]}" rm "$ctr" >/dev/null' EXIT
mnt=$("${B[@]}" mount "$ctr")
P=/usr/local/nginx

rm -rf "$DEST"
mkdir -p "$DEST/sbin" "$DEST/modules" "$DEST/conf" "$DEST/lib" "$DEST/bin"
cp "$mnt$P/sbin/nginx" "$DEST/sbin/"
cp "$mnt$P/modules/ngx_http_gpu_module.so" "$DEST/modules/"
cp "$mnt$P/conf/"* "$DEST/conf/"

# The shared libraries the image resolves for nginx and the module, less glibc's own and
# the GCC runtime (see above).
"${B[@]}" run --isolation chroot "$ctr" -- ldd "$P/sbin/nginx" "$P/modules/ngx_http_gpu_module.so" \
    | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' | sort -u \
    | while read -r name path; do
        case "$name" in
            libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*|libgcc_s.so.*|libstdc++.so.*) ;;
            *) cp -L "$mnt$path" "$DEST/lib/$name" ;;
        esac
    done

newest=$(objdump -T "$DEST/sbin/nginx" "$DEST/modules/ngx_http_gpu_module.so" "$DEST"/lib/* \
    | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
if [ "$(printf '%s\n%s\n' "$newest" "$MAX_GLIBC" | sort -V | tail -n1)" != "$MAX_GLIBC" ]; then
    echo "the image's binaries need glibc $newest, newer than $MAX_GLIBC" >&2
    exit 1
fi

# The BLAKE3 reference for the smoke test: Debian's b3sum, independent of the module.
cp "$(command -v b3sum)" "$DEST/bin/b3sum"
{
    echo "image: $IMAGE $("${B[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE")"
    echo "exported: $(date -u +%FT%TZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "newest glibc symbol needed: $newest"
    "$mnt$P/sbin/nginx" -V 2>&1
} >"$DEST/IMAGE-INFO"
ls -l "$DEST"/*/ && du -sh "$DEST"
