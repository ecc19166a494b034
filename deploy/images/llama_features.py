"""Checks that the llama.cpp in an image was compiled for the CPU features its CMAKE_ARGS asked for, no more.

    python deploy/images/llama_features.py -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON ...

llama.cpp reports the instruction sets it was compiled with (llama_print_system_info: "AVX2 = 1 | ..."; compile
time, not what this CPU has). A build tuned to the build host (GGML_NATIVE, the default) or one that picked up
a wheel built with other flags (pip's wheel cache ignores CMAKE_ARGS) shows sets nobody asked for, and the image
would die with an illegal instruction on an older CPU. Exits 1 naming them. Standard library only, plus
llama_cpp when run as a script.
"""

from __future__ import annotations

import re
import sys

# x86 vector extensions an image must not use unless asked: a host-tuned build turns these on (AVX-512 on the
# build machines here). Base sets such as SSE3 come with AVX and are not switches of their own.
GUARDED_PREFIXES = ("AVX", "AMX")
# Flags that name an instruction set llama.cpp reports (the rest, such as NATIVE or OPENMP, are not sets).
_SWITCHES = frozenset({"AVX", "AVX2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16",
                       "AMX_TILE", "AMX_INT8", "AMX_BF16", "FMA", "F16C", "BMI2", "SSE42"})
_FEATURE = re.compile(r"([A-Z0-9_]+) = ([01])")
_FLAG = re.compile(r"^-DGGML_([A-Z0-9_]+)=(ON|OFF)$")


def requested(cmake_args: list[str]) -> dict[str, bool]:
    """{feature: on} from -DGGML_<FEATURE>=ON|OFF flags; other flags are not about instruction sets."""
    flags: dict[str, bool] = {}
    for arg in cmake_args:
        match = _FLAG.match(arg)
        if match is not None:
            flags[match.group(1)] = match.group(2) == "ON"
    return flags


def compiled(system_info: str) -> dict[str, bool]:
    """{feature: compiled in} from llama_print_system_info's text."""
    return {name: value == "1" for name, value in _FEATURE.findall(system_info)}


def problems(cmake_args: list[str], system_info: str) -> list[str]:
    """What makes this build unfit for CPUs other than the build host's; empty when it is fit."""
    flags = requested(cmake_args)
    features = compiled(system_info)
    found: list[str] = []
    if flags.get("NATIVE", True):
        found.append("CMAKE_ARGS lacks -DGGML_NATIVE=OFF: llama.cpp would be tuned to the build host's CPU")
    missing = sorted(name for name, on in flags.items() if on and name in _SWITCHES and not features.get(name))
    if missing:
        found.append(f"asked for but not compiled in: {', '.join(missing)} (was the wheel built with these flags?)")
    extra = sorted(name for name, on in features.items()
                   if on and name.startswith(GUARDED_PREFIXES) and not flags.get(name, False))
    if extra:
        found.append(f"compiled in but not asked for: {', '.join(extra)} (a build tuned to its host, or a cached "
                     f"wheel built with other flags; rebuild without pip's cache)")
    return found


def main(argv: list[str] | None = None) -> int:
    import llama_cpp

    cmake_args = sys.argv[1:] if argv is None else argv
    info = llama_cpp.llama_print_system_info().decode()
    print(f"llama.cpp {llama_cpp.__version__} built with {' '.join(cmake_args)}: {info.strip()}")
    found = problems(cmake_args, info)
    for problem in found:
        print(f"llama_features: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
