"""Generates the committed gRPC/protobuf Python from protos/ (the one codegen target)."""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "workers" / "stratus_workers" / "api"
PACKAGE = "stratus_workers.api"


def _generate(dest: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            text = src.read_text()
            # protoc writes imports relative to the proto root (`from stratus.v1 import x`);
            # the modules live flat inside our package instead.
            text = re.sub(r"^from stratus\.v1 import ", f"from {PACKAGE} import ", text, flags=re.M)
            text = re.sub(r"^import stratus\.v1\.(\w+)", rf"import {PACKAGE}.\1", text, flags=re.M)
            text = text.replace("stratus.v1.inference_pb2", f"{PACKAGE}.inference_pb2")
            target = dest / src.name
            target.write_text(text)
            written.append(target)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    args = parser.parse_args()
    if not args.check:
        for path in _generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generate(Path(tmp))
        stale = [p.name for p in fresh if not (OUT / p.name).exists() or not filecmp.cmp(p, OUT / p.name, False)]
    if stale:
        print(f"generated code is stale: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
