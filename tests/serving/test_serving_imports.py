"""The serving image stays small: importing every serving module must not pull in torch or onnx."""

from __future__ import annotations

import subprocess
import sys


def test_serving_imports_neither_torch_nor_onnx():
    code = (
        "import sys, pkgutil, importlib, serving\n"
        "for m in pkgutil.walk_packages(serving.__path__, 'serving.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in ('torch', 'onnx', 'torchvision', 'timm') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
