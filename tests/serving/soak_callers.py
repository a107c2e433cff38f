"""Callers for tests/serving/test_serving_soak.py, in a process of their own as real callers are: sharing
the server's interpreter, a dozen client threads would hold up its gRPC thread for the GIL and make
its answers late by their own doing. Prints what every call ended with, as JSON.

    python tests/serving/soak_callers.py TARGET SECONDS CALLERS DEADLINES_S IMAGE...
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from serving.client import Client
from serving.gen.classifier.v1 import classifier_pb2 as pb


def main(argv: list[str]) -> None:
    target, seconds, callers, deadlines = argv[0], float(argv[1]), int(argv[2]), argv[3]
    choices = [float(d) for d in deadlines.split(",")]
    images = [Path(p).read_bytes() for p in argv[4:]]
    seen: Counter[str] = Counter()  # "method code" -> calls
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        with Client(target) as c:
            while time.monotonic() < end:
                deadline = rng.choice(choices)
                batch = rng.random() < 0.3
                try:
                    if batch:
                        request = pb.PredictBatchRequest(requests=[pb.PredictRequest(image=rng.choice(images))] * 2)
                        c.stub.PredictBatch(request, timeout=deadline)
                    else:
                        c.stub.Predict(pb.PredictRequest(image=rng.choice(images)), timeout=deadline)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    seen[f"{'PredictBatch' if batch else 'Predict'} {code}"] += 1

    threads = [threading.Thread(target=caller, args=(s,), daemon=True) for s in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    if any(t.is_alive() for t in threads):
        sys.exit("a call hung past its deadline")
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1:])
