#!/usr/bin/env bash
# Local base images for machines that reach no container registry (CI, air-gapped
# hosts): Debian bookworm made with debootstrap from the machine's own apt mirror,
# imported into Docker. Production builds use the usual public images instead
# (every Dockerfile takes its base as a build argument).
#
#   docker/make-base-images.sh   -> bastion-base:bookworm (gateway), bastion-engine-base:bookworm
#                                   (CPU engine), bastion-postgres-base:bookworm
#
# The mirror is read from this machine's apt sources at run time, so no host
# name is written into the project. Each image is built once and kept.
set -euo pipefail
mirror=$(sed -n -E 's/^URIs:[[:space:]]*([^[:space:]]+).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=$(sed -n -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+bookworm[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n1 || true)
[ -n "$mirror" ] || { echo "no Debian mirror in this machine's apt sources" >&2; exit 2; }

build() {  # build IMAGE PACKAGES
    local image=$1 packages=$2 root
    if docker image inspect "$image" >/dev/null 2>&1; then echo "$image: present"; return; fi
    root=$(mktemp -d /tmp/bastion-rootfs.XXXXXX)
    debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; rm -rf "$root"; return 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - "$image" >/dev/null
    rm -rf "$root" "$root.log"
    echo "$image: built"
}

build bastion-base:bookworm python3,python3-venv,ca-certificates &
base=$!
# vLLM's CPU kernels link libnuma; torch.compile (vLLM CPU compiles its model
# graph with inductor) needs a C++ compiler and Python's headers.
build bastion-engine-base:bookworm python3,python3-venv,python3-dev,g++,libnuma1,ca-certificates &
engine=$!
build bastion-postgres-base:bookworm postgresql-15,ca-certificates &
pg=$!
wait $base
wait $engine
wait $pg
