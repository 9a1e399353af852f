#!/usr/bin/env bash
# Prepare, on a machine with PyPI, everything the lent GPU machine lacks, in
# parts small enough to travel (the device tool carries at most 64 MiB a call).
#
#   bench/gpu/fetch_wheels.sh            -> .whl/parts/part-NN (+ SHA256SUMS)
#
# Three sets, all CPython 3.12 manylinux wheels, downloaded with --no-deps so
# nothing the device image already has (device-image-pip-freeze.txt) travels:
#   engine-wheels.txt    vLLM 0.26.0 and what it needs beyond the image
#   gateway wheels       Bastion's own dependencies, from the local .venv's
#                        versions, minus what the image has
# Bastion itself travels as the working tree (run.sh puts it on PYTHONPATH).
# The wheels are packed into one tar and split; `bench/gpu/run.sh install` joins them.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=bench/gpu
OUT=.whl
PART_BYTES=${PART_BYTES:-62000000}
rm -rf "$OUT"/stage "$OUT"/parts
mkdir -p "$OUT"/stage "$OUT"/parts "$OUT"/cache

platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 \
         manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
fetch() {  # fetch NAME... into the cache, CPython 3.12 wheels only
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$OUT"/cache "$@"
}

# 1. vLLM and its missing dependencies (one requirement per line).
mapfile -t engine < <(grep -v -E '^\s*(#|$)' "$HERE"/engine-wheels.txt)
fetch "${engine[@]}"

# 2. The gateway's dependencies at the versions tested here, minus the image's.
have=$(sed -E 's/[=<>].*//' "$HERE"/device-image-pip-freeze.txt | tr 'A-Z_.' 'a-z--')
mapfile -t gateway < <(.venv/bin/pip freeze --exclude-editable | grep -v '^-e' | while read -r req; do
    name=$(echo "${req%%==*}" | tr 'A-Z_.' 'a-z--')
    grep -qx "$name" <<<"$have" || echo "$req"
done)
fetch "${gateway[@]}"

# One wheel per project: the newest download wins (pip refuses two versions).
python3 - "$OUT"/cache "$OUT"/stage <<'PY'
import pathlib, re, shutil, sys
from packaging.utils import parse_wheel_filename
src, dst = map(pathlib.Path, sys.argv[1:])
best = {}
for whl in src.glob("*.whl"):
    name, version, *_ = parse_wheel_filename(whl.name)
    if name not in best or version > best[name][0]:
        best[name] = (version, whl)
for _, whl in best.values():
    shutil.copy2(whl, dst / whl.name)
print(f"{len(best)} wheels")
PY
tar -C "$OUT"/stage -cf - . | split -b "$PART_BYTES" -d - "$OUT"/parts/part-
(cd "$OUT"/parts && sha256sum part-* > SHA256SUMS && tar -C ../stage -cf - . | sha256sum | cut -d' ' -f1 > TAR.sha256)
ls -la "$OUT"/parts
