"""gRPC inference for an export bundle: ONNX Runtime, the bundle's TTA views, averaged probabilities. No torch."""
