# Shared by the image scripts and the install test (sourced): where buildah keeps its images,
# and their names; the cached Debian root filesystem both start from.
# buildah runs as root with vfs storage and chroot isolation (no Docker engine, no
# overlayfs or user namespaces needed), in a store of its own so that it never mixes with
# another buildah or podman store on the machine.

NGX_IMAGE_CACHE=${NGX_IMAGE_CACHE:-/var/cache/ngx-gpu-image}
# The image under test, and the local stand-ins for rust:1-slim-bookworm and the CUDA
# runtime base (no registry here).
IMAGE=${NGX_IMAGE:-localhost/ngx-gpu-module:test}
BASE_RUNTIME=localhost/ngx-gpu-test/bookworm
BASE_BUILDER=localhost/ngx-gpu-test/bookworm-rust

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
B=($SUDO buildah --root "$NGX_IMAGE_CACHE/storage" --runroot /run/ngx-gpu-image
   --storage-driver vfs)

have_image() { "${B[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# A Debian bookworm root filesystem (debootstrap --variant=minbase: the base system only)
# with apt sources for main, updates and security, as Debian's own images have them
# (security has the cargo of the image test's builder base), and no package lists; kept as
# a tarball in the cache, made when absent (debootstrap's output in the log file $1). The
# image test's runtime base and the install test's clean machine both start from it.
NGX_DEBIAN_SUITE=bookworm
NGX_DEBIAN_MIRROR=${NGX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
MINBASE_TARBALL=$NGX_IMAGE_CACHE/$NGX_DEBIAN_SUITE-minbase.tar

ensure_minbase_tarball() {
    local log=$1 root part s=$NGX_DEBIAN_SUITE m=$NGX_DEBIAN_MIRROR
    [ -f "$MINBASE_TARBALL" ] && return
    if ! command -v debootstrap >/dev/null; then
        echo "installing: debootstrap"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    root=$(mktemp -d)
    chmod 755 "$root" # mktemp's 0700 would be the root directory's mode in the tarball
    if ! $SUDO debootstrap --variant=minbase "$s" "$root" "$m" >"$log" 2>&1; then
        tail -n 20 "$log"
        echo "debootstrap failed (log: $log)"
        $SUDO rm -rf "$root"
        return 1
    fi
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s-security %s-security main\n' \
        "$m" "$s" "$m" "$s" "$m" "$s" | $SUDO tee "$root/etc/apt/sources.list" >/dev/null
    $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    $SUDO mkdir -p "$NGX_IMAGE_CACHE"
    # A name of this run's own, then a rename: a concurrent run never reads half a tarball.
    part=$MINBASE_TARBALL.part.$$
    $SUDO tar -C "$root" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' \
        --exclude='./sys/*' -cf "$part" .
    $SUDO mv "$part" "$MINBASE_TARBALL"
    $SUDO rm -rf "$root"
}
