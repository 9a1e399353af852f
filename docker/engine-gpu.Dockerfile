# The GPU engine: the official vLLM OpenAI image, pinned by version, with
# Bastion's entrypoint (engine key from a secret file, never argv) and a
# non-root user. The sandbox is set where it is started (docker/compose.yaml,
# `bastion engine up`). Base image and version are build arguments; on a host
# without a registry, load the image from a file first (`docker load`).
#   docker build -f docker/engine-gpu.Dockerfile -t bastion-engine-gpu .
ARG BASE_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${BASE_IMAGE}
COPY engine-entrypoint.sh /usr/local/bin/bastion-engine
# The compile caches' tmpfs takes this folder's mode (Docker copies it up over mode=).
RUN install -d -m 1777 /var/cache/bastion-engine \
 && groupadd --system --gid 10002 engine \
 && useradd --system --uid 10002 --gid 10002 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin engine
ENV BASTION_ENGINE_PYTHON=python3
USER 10002:10002
ENTRYPOINT ["/usr/local/bin/bastion-engine"]
