"""The committed gRPC stubs are exactly what protoc makes from protos/ today."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def stubs(root):
    return sorted(
        p.relative_to(root) for p in (root / "serving" / "gen").rglob("*_pb2*") if p.suffix in {".py", ".pyi"}
    )


def test_committed_stubs_match_protos(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = stubs(tmp_path)
    assert generated, "protoc generated nothing"
    committed = stubs(ROOT)
    assert committed == generated, "stub files differ: run python scripts/gen_protos.py"
    for rel in generated:
        assert (ROOT / rel).read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run python scripts/gen_protos.py and commit the result"
        )


def test_stubs_import_with_the_pinned_runtime():
    from serving.gen.classifier.v1 import classifier_pb2 as pb

    request = pb.PredictRequest(image=b"x", top_k=2)
    assert not request.HasField("tta")
    assert pb.PredictRequest.FromString(request.SerializeToString()) == request
