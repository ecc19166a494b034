"""Says in one line what the kind e2e suite lacks on this machine; `make e2e` runs it first."""

from __future__ import annotations

import shutil
import subprocess
import sys

# `make e2e` exits 0 on this code: a missing tool is a skip, not a failure.
MISSING_EXIT_CODE = 3


def missing_tools() -> list[str]:
    """What stands between this machine and a kind cluster, in words; empty when nothing does."""
    missing: list[str] = []
    if shutil.which("docker") is None:
        missing.append("docker (not on PATH)")
    else:
        try:
            info = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
            if info.returncode != 0:
                missing.append("a running Docker daemon (docker info failed)")
        except subprocess.TimeoutExpired:
            missing.append("a responsive Docker daemon (docker info timed out)")
    for tool in ("kind", "kubectl"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (not on PATH)")
    return missing


def skip_reason(missing: list[str]) -> str:
    return "kind e2e skipped: needs " + ", ".join(missing)


def main() -> int:
    missing = missing_tools()
    if missing:
        print(skip_reason(missing))
        return MISSING_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
