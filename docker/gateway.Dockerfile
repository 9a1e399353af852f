# The gateway: Bastion's wheels in a virtual environment, run as a non-root user;
# compose runs it with a read-only root filesystem. Built offline: the wheels are
# prepared beforehand (docker/build-images.sh) and installed with --no-index.
#   docker build -f docker/gateway.Dockerfile --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t bastion-gateway .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/bastion \
 && /opt/bastion/bin/pip install --no-index --no-cache-dir --no-compile --find-links /tmp/wheels bastion-gateway \
 && /opt/bastion/bin/python -m compileall -q /opt/bastion/lib

FROM ${BASE_IMAGE}
COPY --from=build /opt/bastion /opt/bastion
RUN groupadd --system --gid 10001 bastion \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin bastion
# Nothing is written beside the code at run time (the root filesystem is read-only).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/bastion/bin:$PATH
USER 10001:10001
ENTRYPOINT ["/opt/bastion/bin/bastion"]
CMD ["serve"]
