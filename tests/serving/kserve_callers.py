"""KServe's own Python clients as callers, for tests/serving/test_serving_kserve.py, in a process of their
own: KServe's compiled protocol stubs and tritonclient's declare the same message names, and one
process cannot import both. Prints, as JSON, what each call answered.

    python tests/serving/kserve_callers.py GRPC_TARGET HTTP_URL IMAGE_FILE PIXELS_NPY MODEL
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def image_input(image: bytes) -> InferInput:
    tensor = InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_).reshape(1, 1))
    return tensor


def pixels_input(pixels: np.ndarray, *, binary: bool) -> InferInput:
    tensor = InferInput("IMAGE", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def probabilities(response) -> list[list[float]]:
    (output,) = response.outputs
    return output.as_numpy().astype(float).tolist()


async def main(grpc_target: str, http_url: str, image: bytes, pixels: np.ndarray, model: str) -> dict:
    out: dict = {}
    grpc_client = InferenceGRPCClient(grpc_target, timeout=30)
    try:
        out["grpc_live"] = await grpc_client.is_server_live()
        out["grpc_ready"] = await grpc_client.is_server_ready()
        out["grpc_model_ready"] = await grpc_client.is_model_ready(model)
        response = await grpc_client.infer(InferRequest(model, infer_inputs=[image_input(image)]))
        out["grpc_bytes"] = probabilities(response)
        response = await grpc_client.infer(InferRequest(model, infer_inputs=[pixels_input(pixels, binary=True)]))
        out["grpc_pixels"] = probabilities(response)
    finally:
        await grpc_client.close()
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        out["rest_live"] = await rest.is_server_live(http_url)
        out["rest_ready"] = await rest.is_server_ready(http_url)
        out["rest_model_ready"] = await rest.is_model_ready(http_url, model)
        out["rest_unknown_model_ready"] = await rest.is_model_ready(http_url, "no_such_model")
        for binary in (True, False):
            request = InferRequest(model, infer_inputs=[pixels_input(pixels, binary=binary)])
            response = await rest.infer(http_url, request, model_name=model)
            out[f"rest_pixels_{'binary' if binary else 'json'}"] = probabilities(response)
        response = await rest.infer(http_url, InferRequest(model, infer_inputs=[image_input(image)]), model_name=model)
        out["rest_bytes"] = probabilities(response)
    finally:
        await rest.close()
    return out


if __name__ == "__main__":
    grpc_target, http_url, image_file, pixels_file, model = sys.argv[1:]
    with open(image_file, "rb") as f:
        data = f.read()
    print(json.dumps(asyncio.run(main(grpc_target, http_url, data, np.load(pixels_file), model))))
