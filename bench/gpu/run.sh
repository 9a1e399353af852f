#!/usr/bin/env bash
# Issue 6 (and issue 10's images) on the lent GPU machine, one phase per call:
#
#   bench/gpu/fetch_wheels.sh                 here: .whl/parts/part-NN
#   bench/gpu/run.sh receive 00 [.. 07]       there, one call per part (carry .whl/parts/part-NN)
#   bench/gpu/run.sh install                  join, check SHA-256, pip install --no-index
#   bench/gpu/run.sh start llama [TP]         build the 1.3 B model, sign, `bastion up` (tensor parallel TP)
#   bench/gpu/run.sh start vision             the tiny LLaVA behind a second gateway
#   bench/gpu/run.sh validate                 bench/gpu/validate.py; results in $OUT
#   bench/gpu/run.sh workers N                a second gateway of N workers on 8002 (Redis from .redis/)
#   bench/gpu/run.sh spread [ARGS]            bench/gpu/spread_load.py: direct against the gateways, c=256
#   bench/gpu/run.sh relay [ARGS]             bench/stream_relay.py against the llama engine
#   bench/gpu/run.sh probe                    fsync latency of the disk the audit database is on
#   bench/gpu/run.sh stop
#
# Files stay in /tmp/bastion-gpu while the machine is warm (30 s after a call);
# `bastion up` runs under setsid so it outlives the call that started it.
# Everything is Bastion's operator CLI: init, signing-key, manifest, keys, up.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WORK=${WORK:-/tmp/bastion-gpu}
SITE=/tmp/site
export PYTHONPATH=$REPO:$SITE PYTHONUNBUFFERED=1
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK"/parts "$OUT"
# Overridable for a smoke test on a machine without a GPU:
#   WORK=/tmp/g PY=.venv/bin/python ENGINE_PY=.venv-engine/bin/python PRESET=tiny DEVICE=cpu bench/gpu/run.sh start llama
PY=${PY:-$(command -v python3)}
ENGINE_PY=${ENGINE_PY:-$PY}
PRESET=${PRESET:-1b}
DEVICE=${DEVICE:-cuda}
bastion() { "$PY" -m gateway.cli "$@"; }
field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

receive() {
    for n in "$@"; do cp .whl/parts/part-"$n" "$WORK"/parts/; done
    [ -f .whl/parts/SHA256SUMS ] && cp .whl/parts/SHA256SUMS .whl/parts/TAR.sha256 "$WORK"/parts/
    ls -la "$WORK"/parts
}

install() {
    (cd "$WORK"/parts && sha256sum -c SHA256SUMS)
    rm -rf "$WORK"/wheels && mkdir -p "$WORK"/wheels
    cat "$WORK"/parts/part-* | tar -C "$WORK"/wheels -xf -
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WORK"/wheels/*.whl
    "$PY" -c "import vllm, litestar, sqlalchemy; print('vllm', vllm.__version__)"
    # A `bastion` command beside the image's Python, as pip would install it
    # (bench/ and tests/support.py start the gateway through it).
    printf '#!/bin/sh\nexec "%s" -m gateway.cli "$@"\n' "$PY" >"$(dirname "$PY")"/bastion
    chmod +x "$(dirname "$PY")"/bastion
}

# deploy NAME PORT ENGINE_PORT MODEL_DIR ENGINE_TOML: a Bastion directory serving one signed model.
deploy() {
    local name=$1 port=$2 engine_port=$3 model=$4 engine=$5 dir=$WORK/$1
    rm -rf "$dir"  # a fresh deployment each time (init keeps an existing config)
    bastion init --dir "$dir" --engine-python "$ENGINE_PY" --port "$port" >/dev/null
    cp bench/gpu/policy.yaml "$dir"/policy.yaml
    [ -f "$WORK"/publisher.json ] || bastion signing-key create --out "$WORK"/publisher.key --json >"$WORK"/publisher.json
    bastion manifest create "$model" --out "$dir"/model.manifest.json --name "$name"
    bastion manifest sign "$dir"/model.manifest.json --key "$WORK"/publisher.key
    local key_id
    key_id=$(field "$WORK"/publisher.json key_id)
    cat >>"$dir"/bastion.toml <<TOML

[[publishers]]
key_id = "$key_id"
public_key = "$WORK/publisher.key.pub"

[[deployments]]
name = "$name"
engine_url = "http://127.0.0.1:$engine_port"
model_dir = "$model"
manifest = "model.manifest.json"

[deployments.engine]
$engine
TOML
    bastion keys create --config "$dir"/bastion.toml --name gpu-validate --json >"$dir"/client-key.json
    setsid "$PY" -m gateway.cli up --config "$dir"/bastion.toml >"$dir"/up.log 2>&1 < /dev/null &
    echo $! >"$dir"/up.pid
    local t=0
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
        if ! kill -0 "$(cat "$dir"/up.pid)" 2>/dev/null; then
            echo "bastion up exited:"; tail -40 "$dir"/up.log "$dir"/state/logs/engine-"$name".log; return 1
        fi
        sleep 2; t=$((t + 2))
        [ $((t % 30)) -eq 0 ] && echo "  $name: ${t}s $(tail -c 150 "$dir"/state/logs/engine-"$name".log 2>/dev/null | tr '\n' ' ')"
    done
    echo "$name ready after ${t}s"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
}

start() {
    case $1 in
    llama)
        local tp=${2:-1}
        "$ENGINE_PY" engine/build_llama.py "$WORK"/models/llama-1b --preset "$PRESET" --device "$DEVICE"
        deploy llama-1b 8000 8100 "$WORK"/models/llama-1b \
            "tensor_parallel_size = $tp
dtype = \"bfloat16\"
max_model_len = 4096
gpu_memory_utilization = 0.6" ;;
    vision)
        "$ENGINE_PY" engine/build_tiny_vision.py "$WORK"/models/tiny-vision
        deploy tiny-vision 8001 8101 "$WORK"/models/tiny-vision \
            'dtype = "bfloat16"
max_model_len = 2048
gpu_memory_utilization = 0.15
enforce_eager = true
limit_mm_per_prompt = {image = 2}' ;;
    esac
}

validate() {
    local key vkey
    key=$(field "$WORK"/llama-1b/client-key.json key)
    echo "open files: $(ulimit -n)"
    "$PY" bench/gpu/validate.py --config "$WORK"/llama-1b/bastion.toml --key "$key" --json "$OUT"/gpu-load.json "$@" || true
    # What the gateway itself said of anything that went wrong under load.
    grep -E '"level": ?"(warning|error)"' "$WORK"/llama-1b/up.log | tail -200 >"$OUT"/gateway-warnings.log || true
    wc -l "$OUT"/gateway-warnings.log; tail -5 "$OUT"/gateway-warnings.log | cut -c1-400
    if [ -f "$WORK"/tiny-vision/client-key.json ]; then
        vkey=$(field "$WORK"/tiny-vision/client-key.json key)
        "$PY" bench/gpu/validate.py --config "$WORK"/tiny-vision/bastion.toml --key "$vkey" \
            --model tiny-vision --vision-model tiny-vision --concurrency
    fi
}

# workers N: a second gateway in front of the same engine, `bastion serve` with
# N worker processes on port 8002 (same state, keys and database), its rate
# limits in a Redis started from Debian's packages unpacked into .redis/
# (the image has no Redis: `bench/gpu/fetch_redis.sh` here, then carry .redis).
workers() {
    local n=$1 dir=$WORK/llama-1b lib=$REPO/.redis/usr/lib/x86_64-linux-gnu
    LD_LIBRARY_PATH=$lib setsid "$REPO"/.redis/usr/bin/redis-server --port 6399 --save '' --appendonly no \
        >"$WORK"/redis.log 2>&1 < /dev/null &
    echo $! >"$WORK"/redis.pid
    sed -e 's/^port = 8000$/port = 8002\nworkers = '"$n"'/' \
        -e 's|^backend = "memory"$|backend = "redis"\nredis_url = "redis://127.0.0.1:6399/0"|' \
        "$dir"/bastion.toml >"$dir"/bastion-workers.toml
    setsid "$PY" -m gateway.cli serve --config "$dir"/bastion-workers.toml >"$dir"/serve-workers.log 2>&1 < /dev/null &
    echo $! >"$dir"/serve-workers.pid
    local t=0
    until curl -sf http://127.0.0.1:8002/readyz >/dev/null; do
        sleep 1; t=$((t + 1))
        [ $t -gt 120 ] && { tail -20 "$dir"/serve-workers.log "$WORK"/redis.log; return 1; }
    done
    echo "$n workers ready after ${t}s"
}

# spread [ARGS]: bench/gpu/spread_load.py, the engine directly against the
# gateway of `start` (and the one of `workers`, when it runs).
spread() {
    local dir=$WORK/llama-1b key ekey
    key=$(field "$dir"/client-key.json key)
    ekey=$(cat "$dir"/state/secrets/engine-llama-1b.key)
    local targets=(--target direct http://127.0.0.1:8100 "$ekey" --target bastion http://127.0.0.1:8000 "$key")
    curl -sf http://127.0.0.1:8002/readyz >/dev/null && targets+=(--target bastion-workers http://127.0.0.1:8002 "$key")
    "$PY" bench/gpu/spread_load.py "${targets[@]}" --json "$OUT"/spread.json "$@"
}

# Stream relay against the running llama engine: added time to first token, chunks/s.
relay() {
    "$PY" bench/stream_relay.py --engine-url http://127.0.0.1:8100 --model llama-1b \
        --engine-key-file "$WORK"/llama-1b/state/secrets/engine-llama-1b.key "$@"
}

# The latency of one durable write on this machine's disk: strict audit makes
# two (intent, outcome) per call, so at concurrency 1 they are added latency.
probe() {
    "$PY" - "$WORK" <<'PY'
import os, statistics, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
times = []
for _ in range(200):
    t = time.perf_counter(); os.write(fd, b"x" * 512); os.fsync(fd); times.append(time.perf_counter() - t)
os.close(fd); os.unlink(path)
times.sort()
print(f"fsync of 512 bytes in {sys.argv[1]}: p50 {statistics.median(times)*1e3:.2f} ms, p99 {times[197]*1e3:.2f} ms")
PY
}

stop() {
    for pidfile in "$WORK"/*/up.pid "$WORK"/*/serve-workers.pid "$WORK"/redis.pid; do
        [ -f "$pidfile" ] && kill -- -"$(cat "$pidfile")" 2>/dev/null || true
    done
}

phase=$1; shift
"$phase" "$@"
