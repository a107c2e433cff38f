"""The export bundle: the contract the trainer writes and the server loads (manifest, files,
preprocessing, ONNX Runtime session, probabilities of files through it), the one implementation of
preprocessing both use, and the CPU count both size their thread pools by. The trainer imports
nothing else of serving but the repository layout it publishes into (tests/test_import_graph.py)."""
