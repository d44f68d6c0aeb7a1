# syntax=docker/dockerfile:1
#
# The sidecar image: run it next to each service (see deploy/README.md).
#
#   docker build -t sidecar:0.1.0 .
#   docker run --rm -v "$PWD/deploy/compose/sidecar.yaml:/etc/sidecar/sidecar.yaml:ro" \
#       -p 127.0.0.1:15001:15001 -p 127.0.0.1:15000:15000 sidecar:0.1.0
#
# The config is read from /etc/sidecar/sidecar.yaml: mount a file (or a ConfigMap directory)
# there. The image ships no config of its own, so a missing mount fails loudly at start.
#
# tests/test_deploy.py replays this file's build steps (the COPY sources, the `pip wheel` and
# `pip install` lines) and runs ENTRYPOINT + CMD and the HEALTHCHECK command for real, so keep
# each of those steps on its own instruction, and keep the install free of shell tricks.

# A patch-level tag: rebuilds get security fixes only when this line changes. Pin the digest
# too (python:3.11.14-slim-bookworm@sha256:...) in a registry you mirror.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: one wheel for the sidecar and one for each pinned dependency, and the request ---
# --- path compiled with mypyc (scripts/build-native.sh) ---------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# The C compiler for the compiled copy; this stage is thrown away, so it ships nowhere.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY scripts/build-native.sh scripts/source-hash.sh ./scripts/
# The versions come from pyproject.toml's pins (== for every direct dependency); the `native`
# extra adds the compiler (mypy's mypyc) and the stubs it reads.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[native]"
# The compiler beside the dependencies whose types it reads, then the compiled copy of the
# package in /native (the runtime stage installs the sidecar's wheel alone). Pinned by the
# wheels above (--no-index: nothing else is found); a layer of its own, so that a change to
# the compile step does not rebuild every wheel.
# hadolint ignore=DL3013,DL3059
RUN pip install --no-cache-dir --no-index --find-links /wheels "sidecar[native]" \
    && bash scripts/build-native.sh /native python

# --- runtime: no compiler, no pip cache, no wheels left behind ------------------------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Resilience sidecar proxy: discovery, load balancing, timeouts, retries, circuit breaking." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml

# Installs only from the wheels built above (--no-index: no second resolution from the network).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels /wheels/sidecar-*.whl

# The compiled copy goes first on the path: the request path runs compiled, the rest of the
# package as the installed source (the copy holds both, built from the same sources).
COPY --from=build /native /opt/sidecar-native
ENV PYTHONPATH=/opt/sidecar-native

# A fixed, numeric, non-root identity, so Kubernetes' runAsNonRoot can check it and
# runAsUser: 10001 matches. /etc/sidecar is only the mount point for the config.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidecar \
    && mkdir -p /etc/sidecar
USER 10001:10001

# 15001: the proxy (the app's calls). 15000: admin (/metrics, /healthz, /readyz, /admin/*).
EXPOSE 15001 15000

# `sidecar run` drains on SIGTERM (stop accepting, finish in-flight up to drain_timeout, exit 0).
STOPSIGNAL SIGTERM

# No curl in a slim image: the standard library does it. Any non-2xx status, refused connection
# or timeout raises, and Python exits 1 (unhealthy). SIDECAR_HEALTHCHECK_URL overrides the URL
# when the config moves the admin port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('SIDECAR_HEALTHCHECK_URL', 'http://127.0.0.1:15000/healthz'), timeout=2)"]

ENTRYPOINT ["sidecar"]
CMD ["run", "-c", "/etc/sidecar/sidecar.yaml"]
