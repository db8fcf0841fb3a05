# Shared by the image scripts (sourced): where buildah keeps its images, and their names.
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
