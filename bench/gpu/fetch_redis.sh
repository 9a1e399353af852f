#!/usr/bin/env bash
# Redis for `bench/gpu/run.sh workers` (the device image has none): Debian's
# packages, unpacked into .redis/ (carried to the device). The server is
# redis-check-rdb, which Debian's redis-server package only links to.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .redis && mkdir -p .redis/debs
(cd .redis/debs && apt-get download redis-tools libjemalloc2 liblzf1 libatomic1)
for deb in .redis/debs/*.deb; do dpkg -x "$deb" .redis; done
rm -rf .redis/debs .redis/usr/share
ln -s redis-check-rdb .redis/usr/bin/redis-server  # what Debian's redis-server package adds
du -sh .redis
