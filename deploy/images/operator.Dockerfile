# The operator image: `stratus operator` (kopf), and no torch at all. Build from the repository root:
#   docker build -f deploy/images/operator.Dockerfile -t ghcr.io/stratus-llm/stratus-operator:0.1.0 .
# (`make images` does this with a local wheelhouse; deploy/images/build.py.) Runs as uid 65532 with a
# read-only root filesystem; the only writable path it needs is /tmp (an emptyDir in the chart).
# No `# syntax=` line: BuildKit would pull that frontend from Docker Hub (see workers.Dockerfile).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Where wheels come from (see workers.Dockerfile); empty: PyPI.
ARG PIP_INSTALL_OPTIONS=""
COPY pyproject.toml README.md /src/
COPY deploy/images/requirements.py /src/deploy/images/requirements.py
COPY operator /src/operator
COPY workers /src/workers
# The project without its dependencies, then every dependency but the data plane's machine-learning stack
# (requirements.py names it): the operator plans and renders, it never loads a model.
RUN python /src/deploy/images/requirements.py operator > /tmp/operator-requirements.txt \
    && pip install ${PIP_INSTALL_OPTIONS} -r /tmp/operator-requirements.txt \
    && pip install ${PIP_INSTALL_OPTIONS} --no-deps /src \
    && python -c "import stratus_operator.main, stratus_operator.tls, stratus_operator.handlers" \
    && stratus --version && stratus operator --help >/dev/null \
    && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the operator image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="stratus-operator" \
      org.opencontainers.image.description="Stratus operator: reconciles LLMDeployments" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 stratus \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin stratus
COPY --from=build /opt/venv /opt/venv
# HOME and caches point at /tmp: the root filesystem is mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /tmp
EXPOSE 8081 9090
CMD ["stratus", "operator"]
