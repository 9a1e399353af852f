#!/usr/bin/env bash
# Start a Docker engine on a machine where none runs (CI, a fresh developer
# machine): install Debian's docker.io, docker-compose and debootstrap if they
# are missing, start dockerd in the background, wait for it. Idempotent.
set -euo pipefail
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    mkdir -p /var/log/bastion
    setsid dockerd >/var/log/bastion/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info --format 'docker {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupVersion}}'
