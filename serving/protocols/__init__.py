"""The wire: classifier.v1 and the Open Inference Protocol servicers, their tensors, and the edge
every call passes (counting, stream limits, cut echoes)."""
