"""Serving speed: the gRPC server against the same work done in-process, measured in the same run.

The limit is what one process does with no server: decode an image, make its TTA views, run them
through ONNX Runtime in one call and average them, image after image. The server is `serving serve`
started as users start it (a subprocess, on loopback), called through our Client, one image per
Predict call, by 1, 4 and 16 callers at once. Both sides see the same photos of varied sizes
(hymenoptera's validation set) and the same bundle (EfficientNet-Lite0 at 224 px with its default
views), and run in turns: at concurrency 1 image by image (limit, pause, server, pause), at higher
concurrency pass by pass, so that the machine's drift lands on both sides alike.

    python bench/serving.py               # fp32 and int8, batching on and off, 1/4/16 callers (~6 min on 2 cores)
    python bench/serving.py --quick       # fp32, batching on, 24 images: under a minute
    python bench/serving.py --threads     # also the in-process thread settings (spinning, intra-op threads)
    python bench/serving.py --quick --protocols grpc,http-binary,http-json --concurrency 1,16
                                          # the HTTP/REST binding beside gRPC: tritonclient.http with binary
                                          # tensors, and the whole request in JSON (the file in base64)

Prints a table per setting (p50/p90/p99 latency and throughput, with the limit beside it), the
time from process start to SERVING, and last the ratios the benchmark exists for: server p50 at
concurrency 1 over the in-process p50 (target at most 1.05), and throughput with 16 callers over
the in-process serial rate (target at least 1.3). --json writes every figure. With --protocols,
each setting is measured once per protocol against the same in-process limit, so the bindings can
be compared through their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, cast

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/serving.py`, this file's folder comes first on sys.path and its name would
# hide the `serving` package; the project's root takes its place.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
VAL = ROOT.parent / "shared" / "data" / "hymenoptera" / "val"
PAUSE_S = 0.01  # between the two sides' turns: ONNX Runtime's threads stop spinning, sockets settle


Precision = Literal["fp32", "fp16", "int8"]
# How the server is called: classifier.v1 Predict through our Client; the Open Inference Protocol's
# HTTP binding through tritonclient.http with binary tensors; or with the whole request in JSON, the
# image in base64, as curl sends it.
PROTOCOLS = ("grpc", "http-binary", "http-json")


@dataclass(frozen=True)
class Setting:
    """One server configuration: the model variant and whether concurrent calls share model runs."""

    precision: Precision
    batching: bool

    @property
    def name(self) -> str:
        return f"{self.precision}, batching {'on' if self.batching else 'off'}"

    def flags(self, views_per_image: int) -> list[str]:
        flags = ["--precision", self.precision]
        if self.batching:  # up to 64 views (16 images with 4 views) from concurrent calls in one run
            return [*flags, "--max-batch-views", "64"]
        # One image per model run, run as soon as it is queued (the server's default on CPUs).
        return [*flags, "--max-batch-views", str(views_per_image), "--max-delay-us", "0"]


@dataclass
class Row:
    """One concurrency level of one setting: the server's calls and the limit's, from the same rounds."""

    setting: str
    concurrency: int
    calls: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # images/s
    limit_p50_ms: float
    limit_rate: float  # images/s, in-process, serial
    ratio_p50: float  # server p50 / limit p50
    ratio_rate: float  # server throughput / limit serial rate
    max_prob_diff: float  # largest |server - in-process| probability


@dataclass
class Result:
    machine: str
    bundle: str
    images: int
    views_per_image: int
    rounds: int
    rows: list[Row] = field(default_factory=list)
    startup_s: dict[str, float] = field(default_factory=dict)
    threads: list[dict] = field(default_factory=list)


def make_bundle(out: Path, *, int8: bool = True, fp16: bool = False, size: int = 224) -> Path:
    """A bundle as `trainer export` writes it: EfficientNet-Lite0 for hymenoptera's two classes at
    `size` px, TTA on by default. The head is untrained: speed does not depend on the weights."""
    import torch

    from trainer.data.augment import tfms_from_model, transforms_side_on
    from trainer.data.loaders import ImageClassifierData
    from trainer.learn.learner import ConvLearner
    from trainer.outputs.export import export

    tfms = tfms_from_model("efficientnet_lite0", size, aug_tfms=transforms_side_on, max_zoom=1.1)
    data = ImageClassifierData.from_paths(VAL.parent, tfms, val_name="val", bs=16, num_workers=0, seed=0)
    torch.manual_seed(0)
    learn = ConvLearner.pretrained(
        "efficientnet_lite0", data, precompute=False, log=lambda _: None, models_dir=out / "models"
    )
    # An accuracy of 0 without TTA makes export keep TTA on for calls that do not say (the default served).
    export(learn, out / "bundle", name="hymenoptera", version="bench", metrics={"accuracy": 0.0}, int8=int8, fp16=fp16)
    return out / "bundle"


class InProcess:
    """The limit: decode, views, one ONNX Runtime run, average; nothing else."""

    def __init__(
        self, bundle: Path, precision: Precision, device: str, spinning: bool = False, intra_op_threads: int = 0
    ):
        from serving.bundle.session import ModelSession

        self.session = ModelSession(
            bundle, precision=precision, device=device, spinning=spinning, intra_op_threads=intra_op_threads
        )
        self.session.warm_up()

    def predict(self, data: bytes) -> np.ndarray:
        from serving.bundle.preprocess import load_views

        m = self.session.manifest
        return self.session.predict(load_views(data, m.preprocessing, m.tta.views_for(None)))[0]


class ServerProcess:
    """`serving serve` in its own process, on a free loopback port; `startup_s` is from spawn to SERVING."""

    def __init__(self, bundle: Path, flags: Sequence[str], device: str, log: Path):
        from serving.client import Client

        self.port, self.http_port = _free_port(), _free_port()
        command = [
            sys.executable, "-m", "serving.cli", "serve", "--bundle", str(bundle), "--port", str(self.port),
            "--http-port", str(self.http_port), "--metrics-port", "off", "--device", device, *flags,
        ]  # fmt: skip
        self._local = threading.local()  # each caller thread's HTTP client: neither kind is shared safely
        self._log = log.open("w")
        start = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.client = Client(f"127.0.0.1:{self.port}", timeout=60)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {log}")
            try:
                if self.client.health() == "SERVING":
                    break
            except Exception:  # not listening yet
                pass
            if time.perf_counter() - start > 120:
                self.close()
                raise RuntimeError(f"the server was not SERVING after 120 s; see {log}")
            time.sleep(0.005)
        self.startup_s = time.perf_counter() - start

    def predict(self, data: bytes) -> np.ndarray:
        reply = self.client.predict(data)
        probs = np.zeros(len(reply.predictions), np.float32)
        for p in reply.predictions:
            probs[p.index] = p.probability
        return probs

    def caller(self, protocol: str) -> Callable[[bytes], np.ndarray]:
        """The function that sends one image by `protocol` and returns its probabilities."""
        return {"grpc": self.predict, "http-binary": self.predict_http_binary, "http-json": self.predict_http_json}[
            protocol
        ]

    def predict_http_binary(self, data: bytes) -> np.ndarray:
        import tritonclient.http as triton_http

        client = getattr(self._local, "triton", None)
        if client is None:
            client = self._local.triton = triton_http.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        tensor = triton_http.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_).reshape(1, 1))
        model = self.model_name()
        return client.infer(model, [tensor]).as_numpy("PROBABILITIES")[0]

    def predict_http_json(self, data: bytes) -> np.ndarray:
        import base64
        import http.client

        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "parameters": {"content_type": "base64"}}
        body = json.dumps({"inputs": [image | {"data": [base64.b64encode(data).decode()]}]})
        connection.request("POST", f"/v2/models/{self.model_name()}/infer", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        return np.array(answer["outputs"][0]["data"], dtype=np.float32)

    def model_name(self) -> str:
        name = getattr(self, "_model_name", None)
        if name is None:
            name = self._model_name = self.client.model_info().model_name
        return name

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn: Callable[[bytes], np.ndarray], data: bytes) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(data)
    return time.perf_counter() - start, out


def concurrent_pass(
    fn: Callable[[bytes], np.ndarray], images: list[bytes], concurrency: int
) -> tuple[float, list[float], list[np.ndarray]]:
    """Every image once, by `concurrency` callers taking the next one as they finish: wall seconds,
    per-call latencies and results in image order."""
    latencies: list[float] = [0.0] * len(images)
    results: list[np.ndarray] = [np.zeros(0)] * len(images)
    next_index = iter(range(len(images)))
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            latencies[i], results[i] = timed(fn, images[i])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(caller) for _ in range(concurrency)]:
            f.result()
    return time.perf_counter() - start, latencies, results


def serial_pass(fn: Callable[[bytes], np.ndarray], images: list[bytes]) -> tuple[float, list[float], list[np.ndarray]]:
    return concurrent_pass(fn, images, 1)


def measure(
    setting: Setting,
    limit: InProcess,
    server: ServerProcess,
    images: list[bytes],
    concurrencies: Sequence[int],
    rounds: int,
    protocol: str = "grpc",
) -> list[Row]:
    """The server called by `protocol` against the in-process limit, round by round, at each concurrency;
    rows are named after the setting, and the protocol unless it is gRPC."""
    row_name = setting.name if protocol == "grpc" else f"{setting.name}, {protocol}"
    call = server.caller(protocol)
    rows = []
    for c in concurrencies:
        server_lat: list[float] = []
        limit_lat: list[float] = []
        rates: list[float] = []
        limit_rates: list[float] = []
        diff = 0.0
        for r in range(rounds):
            if c == 1:
                # Image by image, alternating which side goes first from round to round.
                wall_s = wall_l = 0.0
                for data in images:
                    sides = [("limit", limit.predict), ("server", call)]
                    for name, fn in sides if r % 2 == 0 else sides[::-1]:
                        time.sleep(PAUSE_S)
                        seconds, out = timed(fn, data)
                        if name == "limit":
                            limit_lat.append(seconds)
                            wall_l += seconds
                            expected = out
                        else:
                            server_lat.append(seconds)
                            wall_s += seconds
                            got = out
                    diff = max(diff, float(np.abs(got - expected).max()))
                rates.append(len(images) / wall_s)
                limit_rates.append(len(images) / wall_l)
            else:
                passes = [
                    ("limit", partial(serial_pass, limit.predict, images)),
                    ("server", partial(concurrent_pass, call, images, c)),
                ]
                outs = {}
                for name, run in passes if r % 2 == 0 else passes[::-1]:
                    time.sleep(20 * PAUSE_S)
                    wall, lat, outs[name] = run()
                    (limit_lat if name == "limit" else server_lat).extend(lat)
                    (limit_rates if name == "limit" else rates).append(len(images) / wall)
                diff = max(
                    diff, *(float(np.abs(a - b).max()) for a, b in zip(outs["server"], outs["limit"], strict=True))
                )
        p50, p90, p99 = np.percentile(np.array(server_lat) * 1e3, [50, 90, 99])
        limit_p50 = float(np.median(limit_lat) * 1e3)
        # Rates are compared round by round (each pair measured back to back), then the median taken.
        ratio_rate = statistics.median(s / b for s, b in zip(rates, limit_rates, strict=True))
        rows.append(
            Row(
                setting=row_name,
                concurrency=c,
                calls=len(server_lat),
                p50_ms=float(p50),
                p90_ms=float(p90),
                p99_ms=float(p99),
                throughput=statistics.median(rates),
                limit_p50_ms=limit_p50,
                limit_rate=statistics.median(limit_rates),
                ratio_p50=float(p50) / limit_p50,
                ratio_rate=ratio_rate,
                max_prob_diff=diff,
            )
        )
        print(_row_line(rows[-1]), flush=True)
    return rows


def thread_settings(bundle: Path, images: list[bytes], device: str, rounds: int) -> list[dict]:
    """The in-process loop (decode, views, run), image after image with no pause, under ONNX Runtime's
    spinning on and off and 1 or all intra-op threads; the settings take turns every CHUNK images.
    With spinning, the threads of one run busy-wait into the next image's decoding."""
    from serving.bundle.preprocess import load_views

    chunk = 8
    configs = [(spin, intra) for spin in (True, False) for intra in (0, 1)]
    sides = {c: InProcess(bundle, "fp32", device, spinning=c[0], intra_op_threads=c[1]) for c in configs}
    m = next(iter(sides.values())).session.manifest
    times: dict[tuple[bool, int], dict[str, list[float]]] = {c: {"loop": [], "decode": []} for c in configs}
    for r in range(rounds):
        for at in range(0, len(images), chunk):
            for c in configs if r % 2 == 0 else configs[::-1]:
                session = sides[c].session
                time.sleep(20 * PAUSE_S)
                for data in images[at : at + chunk]:
                    t0 = time.perf_counter()
                    made = load_views(data, m.preprocessing, m.tta.views_for(None))
                    t1 = time.perf_counter()
                    session.predict(made)
                    times[c]["loop"].append(time.perf_counter() - t0)
                    times[c]["decode"].append(t1 - t0)
    return [
        {
            "spinning": spin,
            "intra_op_threads": intra or "all",
            "loop_ms": 1e3 * statistics.median(t["loop"]),
            "decode_in_loop_ms": 1e3 * statistics.median(t["decode"]),
            "run_in_loop_ms": 1e3 * (statistics.median(t["loop"]) - statistics.median(t["decode"])),
        }
        for (spin, intra), t in times.items()
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs"


def _row_line(row: Row) -> str:
    return (
        f"{row.setting:<22} {row.concurrency:>3} {row.calls:>5} {row.p50_ms:>7.1f} {row.p90_ms:>7.1f} "
        f"{row.p99_ms:>7.1f} {row.throughput:>7.1f} {row.limit_p50_ms:>8.1f} {row.limit_rate:>7.1f} "
        f"{row.ratio_p50:>6.2f}x {row.ratio_rate:>6.2f}x {row.max_prob_diff:>8.1e}"
    )


HEADER = (
    f"{'setting':<22} {'c':>3} {'calls':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'img/s':>7} "
    f"{'limit ms':>8} {'lim/s':>7} {'p50 x':>7} {'rate x':>7} {'|dp|':>8}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fp32, batching on, 24 images, 1 round: under a minute")
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: one made for this run)")
    parser.add_argument(
        "--photos", type=Path, default=VAL, help="folder of images, searched below (default: %(default)s)"
    )
    parser.add_argument("--keep", type=Path, help="make the bundle here and keep it (reused when present)")
    parser.add_argument("--images", type=int, default=0, help="photos used (default: all 153, --quick 24)")
    parser.add_argument("--rounds", type=int, default=0, help="passes over the photos (default 2, --quick 1)")
    parser.add_argument("--precisions", default="", help="comma-separated (default fp32,int8; --quick fp32)")
    parser.add_argument("--batching", default="", help="on, off or on,off (default on,off; --quick on)")
    parser.add_argument("--concurrency", default="1,4,16", help="callers at once, comma-separated")
    parser.add_argument(
        "--protocols", default="grpc", help=f"how the server is called, comma-separated: {', '.join(PROTOCOLS)}"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--threads", action="store_true", help="also compare ONNX Runtime thread settings in-process")
    parser.add_argument("--server-flag", action="append", default=[], help="extra `serving serve` flag (repeatable)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)

    if not args.photos.is_dir():
        print(f"bench/serving.py: {args.photos} is missing; give --photos or lay out ../shared/data", file=sys.stderr)
        return 2
    n_images = args.images or (24 if args.quick else 10**9)
    rounds = args.rounds or (1 if args.quick else 2)
    precisions = (args.precisions or ("fp32" if args.quick else "fp32,int8")).split(",")
    batching = (args.batching or ("on" if args.quick else "on,off")).split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    protocols = args.protocols.split(",")
    if unknown := set(protocols) - set(PROTOCOLS):
        parser.error(f"unknown protocol(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROTOCOLS)}")
    files = sorted(p for p in args.photos.rglob("*") if p.is_file())
    # Every n-th photo, so that a short run still sees both classes and varied sizes.
    step = max(1, len(files) // min(n_images, len(files)))
    images = [p.read_bytes() for p in files[::step][:n_images]]

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        bundle = args.bundle or work / "bundle"
        if not (bundle / "manifest.json").is_file():
            print(f"making the bundle in {bundle} (about a minute) ...", flush=True)
            make_bundle(work, int8="int8" in precisions, fp16="fp16" in precisions)
        from serving.bundle.manifest import load_bundle

        manifest, _ = load_bundle(bundle)
        views = len(manifest.tta.views_for(None))
        result = Result(machine(), str(bundle), len(images), views, rounds)
        print(
            f"{machine()}; {len(images)} photos, {views} views each ({manifest.preprocessing.input_size} px), "
            f"{rounds} round(s); device {args.device}\n",
            flush=True,
        )
        if args.threads:
            result.threads = thread_settings(bundle, images, args.device, rounds)
            print(f"{'spinning':>8} {'intra':>5} {'loop ms':>8} {'decode ms':>9} {'run ms':>7}")
            for t in result.threads:
                print(
                    f"{t['spinning']!s:>8} {t['intra_op_threads']!s:>5} {t['loop_ms']:>8.1f} "
                    f"{t['decode_in_loop_ms']:>9.1f} {t['run_in_loop_ms']:>7.1f}"
                )
            print()
        print(HEADER, flush=True)
        for precision in precisions:
            limit = InProcess(bundle, cast(Precision, precision), args.device)
            for b in batching:
                setting = Setting(cast(Precision, precision), b == "on")
                server = ServerProcess(
                    bundle, setting.flags(views) + args.server_flag, args.device, work / "server.log"
                )
                try:
                    result.startup_s[setting.name] = server.startup_s
                    for protocol in protocols:
                        result.rows += measure(setting, limit, server, images, concurrencies, rounds, protocol)
                finally:
                    server.close()
            del limit

    print("\ntime from process start to SERVING: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.startup_s.items()))
    print()
    for row in result.rows:
        if row.concurrency == 1:
            print(
                f"{row.setting}: server p50 at concurrency 1 / in-process p50 = {row.ratio_p50:.3f}x (target <= 1.05)"
            )
    for row in result.rows:
        if row.concurrency == max(concurrencies) and row.concurrency > 1:
            print(
                f"{row.setting}: throughput at concurrency {row.concurrency} / in-process serial rate = "
                f"{row.ratio_rate:.3f}x (target >= 1.3)"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
