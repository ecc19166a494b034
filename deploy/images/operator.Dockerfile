# syntax=docker/dockerfile:1.7
# The operator image: `stratus operator` (kopf). Build from the repository root:
#   docker build -f deploy/images/operator.Dockerfile -t ghcr.io/stratus-llm/stratus-operator:0.1.0 .
# (`make images` does this for both images.) Runs as uid 65532 with a read-only root filesystem;
# the only writable path it needs is /tmp (an emptyDir in the chart).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index: `pip install .` would otherwise resolve a multi-GB CUDA build.
# The operator only imports the spec types, but the package depends on torch as a whole.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY workers /src/workers
RUN pip install /src \
    && python -c "import stratus_operator, stratus_workers, kopf" \
    && stratus --version

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
