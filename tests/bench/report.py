"""Shared by the benchmark scripts: where they run, and replacing their own section of a markdown file."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where that is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming this machine and its software, for the header of a result table."""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other work), "
        f"Python {platform.python_version()}; {date.today().isoformat()}"
    )


def write_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Put `body` between `<!-- NAME:start -->` and `<!-- NAME:end -->` in `path`, keeping everything else."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else f"{title}\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
