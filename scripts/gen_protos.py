"""Generate the Python gRPC stubs under serving/gen/ from the .proto files in protos/.

The stubs are committed so that `serving` installs without grpcio-tools; tests/test_protos.py
regenerates them into a temporary folder and fails when the committed ones differ.
Run after every change to protos/:  python scripts/gen_protos.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# protos/classifier/v1/x.proto is compiled as serving/gen/classifier/v1/x.proto, so the generated
# modules import each other as `serving.gen.classifier.v1...` and live inside the serving package.
VIRTUAL_ROOT = "serving/gen"


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for every .proto under protos/ into out_dir; return the files written."""
    from grpc_tools import protoc  # dev dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in proto_files():
        args = [
            "grpc_tools.protoc",
            f"-I{VIRTUAL_ROOT}={PROTOS}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return sorted(p for p in (out_dir / VIRTUAL_ROOT).rglob("*") if p.suffix in {".py", ".pyi"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write serving/gen/ under (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
