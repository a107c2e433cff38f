"""Callers for tests/serving/test_serving_soak_hostile.py, in a process of their own: a mix of valid and
hostile calls over both protocols, each with a deadline, for SECONDS. Prints, as JSON, what every
call of each kind ended with and how late any valid call came back.

    python tests/serving/hostile_callers.py TARGET SECONDS CALLERS
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter

import grpc
from test_serving_decoders import big_png, jpeg_segment_flood, photo, png_chunk_flood, tiff_tile_bomb

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.gen.inference import grpc_service_pb2 as oip
from serving.gen.inference import grpc_service_pb2_grpc as oip_grpc

VALID_DEADLINE_S = 5.0
HOSTILE_DEADLINE_S = 2.0
LATE_S = 0.5  # past its deadline, a call that has not come back counts as late


def infer_request(image: bytes) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        inputs=[oip.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(image).to_bytes(4, "little") + image],
    )


def tensor_bomb() -> oip.ModelInferRequest:
    """A typed BYTES tensor declared as one image, carrying a million elements."""
    request = oip.ModelInferRequest(
        inputs=[oip.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])]
    )
    request.inputs[0].contents.bytes_contents.extend([b"x" * 8] * 1_000_000)
    return request


def fan_out() -> oip.ModelInferRequest:
    request = infer_request(photo())
    for _ in range(1000):
        request.outputs.add(name="PROBABILITIES")
    return request


def main(target: str, seconds: float, callers: int) -> None:
    valid = [photo(seed=i) for i in range(4)]
    hostile = {
        "tile_bomb": tiff_tile_bomb(),
        "jpeg_flood": jpeg_segment_flood(),
        "png_flood": png_chunk_flood(),
        "big_png": big_png(4000),  # 16 megapixels of work, valid
        "truncated": photo()[:200],
    }
    tensors = {"tensor_bomb": tensor_bomb(), "fan_out": fan_out()}
    seen: Counter[str] = Counter()  # "kind code" -> calls
    late: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            classifier, inference = pb_grpc.ClassifierStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < end:
                r = rng.random()
                start = time.monotonic()
                deadline = HOSTILE_DEADLINE_S
                try:
                    if r < 0.4:
                        kind, deadline = "valid_predict", VALID_DEADLINE_S
                        classifier.Predict(pb.PredictRequest(image=rng.choice(valid)), timeout=deadline)
                    elif r < 0.55:
                        kind, deadline = "valid_infer", VALID_DEADLINE_S
                        inference.ModelInfer(infer_request(rng.choice(valid)), timeout=deadline)
                    elif r < 0.85:
                        kind = rng.choice(sorted(hostile))
                        image = hostile[kind]
                        if rng.random() < 0.5:
                            classifier.Predict(pb.PredictRequest(image=image), timeout=deadline)
                        else:
                            inference.ModelInfer(infer_request(image), timeout=deadline)
                    elif r < 0.95:
                        kind = rng.choice(sorted(tensors))
                        inference.ModelInfer(tensors[kind], timeout=deadline)
                    else:
                        kind = "idle_stream"
                        stop = threading.Event()
                        stream = inference.ModelStreamInfer(silent(stop))
                        time.sleep(rng.uniform(0.5, 3))
                        stream.cancel()
                        stop.set()
                        raise_if_not_cancelled(stream)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                took = time.monotonic() - start
                with lock:
                    seen[f"{kind} {code}"] += 1
                    if kind.startswith("valid") and took > deadline + LATE_S:
                        late.append(took)

    threads = [threading.Thread(target=caller, args=(s,), daemon=True) for s in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    if any(t.is_alive() for t in threads):
        sys.exit("a call hung past its deadline")
    print(json.dumps({"seen": seen, "late": late}))


def silent(stop: threading.Event):
    """A request stream that sends nothing until `stop`."""
    stop.wait()
    yield from ()


def raise_if_not_cancelled(stream) -> None:
    try:
        for _ in stream:
            pass
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            raise


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
