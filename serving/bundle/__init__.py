"""The export bundle: the contract the trainer writes and the server loads (manifest, files,
preprocessing, ONNX Runtime session), and the one implementation of preprocessing both use."""
