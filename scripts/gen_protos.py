"""Generate the Python gRPC stubs under serving/gen/ from the .proto files in protos/.

The stubs are committed so that `serving` installs without grpcio-tools; tests/serving/test_protos.py
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
# Packages whose stubs register in a descriptor pool of their own instead of protobuf's default one.
# `inference` is also the package of tritonclient's compiled copy of the same protocol, and one pool
# refuses a second file declaring the same message names: a process that imports both (a test, a
# benchmark, an operator's tool beside the server) would fail on import. Names never go on the wire
# except the service's, so a separate pool changes nothing a client sees.
PRIVATE_POOL = ("inference",)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "_POOL = _descriptor_pool.DescriptorPool()  # scripts/gen_protos.py: PRIVATE_POOL\nDESCRIPTOR = _POOL.AddSerializedFile("


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
        if proto.relative_to(PROTOS).parts[0] in PRIVATE_POOL:
            _use_own_pool(out_dir / VIRTUAL_ROOT / proto.relative_to(PROTOS).with_name(f"{proto.stem}_pb2.py"))
    return sorted(p for p in (out_dir / VIRTUAL_ROOT).rglob("*") if p.suffix in {".py", ".pyi"})


def _use_own_pool(module: Path) -> None:
    text = module.read_text()
    if text.count(_DEFAULT_POOL) != 1:
        raise SystemExit(f"{module}: protoc's output changed shape; update _DEFAULT_POOL in {__file__}")
    module.write_text(text.replace(_DEFAULT_POOL, _OWN_POOL))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write serving/gen/ under (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
