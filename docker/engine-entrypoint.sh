#!/bin/sh
# Start vLLM's OpenAI server with the arguments Bastion renders from the engine
# spec (engine/spec.py). The API key is read from a secret file and handed over
# in the environment, so it shows neither in argv (`ps`, `docker inspect`) nor in
# the container's configured environment.
set -eu
key_file=${BASTION_ENGINE_KEY_FILE:-/run/secrets/engine_key}
if [ ! -r "$key_file" ]; then
    echo "bastion-engine: the engine key $key_file is missing or unreadable" >&2
    exit 2
fi
VLLM_API_KEY=$(cat "$key_file")
export VLLM_API_KEY
# The root filesystem is read-only. /tmp is a noexec tmpfs; the compile caches
# (torch inductor and Triton build shared objects and load them) get a tmpfs of
# their own that allows exec (engine/container.py, docker/compose.yaml).
cache=${BASTION_ENGINE_CACHE:-/var/cache/bastion-engine}
export HOME=/tmp/home XDG_CACHE_HOME="$cache" VLLM_CACHE_ROOT="$cache/vllm" \
    TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton"
mkdir -p "$HOME" "$cache"
# The engine has no network; it listens on the Unix socket its command names
# (--uds), in a folder shared with the gateway: setgid to the gateway's group,
# so umask 007 lets that group connect and keeps everyone else out. A socket
# left by an engine that died (a restart while the gateway holds the folder)
# would make vLLM's bind fail; only this container's engine writes there.
umask 007
previous=""
for arg in "$@"; do
    if [ "$previous" = "--uds" ] && [ -S "$arg" ]; then
        rm -f "$arg"
    fi
    previous=$arg
done
exec "${BASTION_ENGINE_PYTHON:-python3}" -m vllm.entrypoints.openai.api_server "$@"
