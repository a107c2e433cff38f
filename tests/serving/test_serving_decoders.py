"""Decoding in worker processes (serving.engine.decoders): whatever an image makes its decoder do, it costs
at most one worker's memory limit for at most the call's deadline, and fails only its own image.

Real worker processes and real files throughout; the hostile images are the ones an attack on the
server sent: a TIFF whose one tile claims 16384x16384, JPEG and PNG files padded with millions of
empty segments or chunks."""

from __future__ import annotations

import functools
import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import server_config
from PIL import Image

from serving.bundle.manifest import Preprocessing, TTAView
from serving.bundle.preprocess import DEFAULT_FORMATS, ImageError, load_views
from serving.client import Client
from serving.engine.decode_worker import Job
from serving.engine.decoders import POLL_S, DecodePool
from serving.engine.errors import CallFailed, ItemFailed
from serving.server import Server

PREP = Preprocessing(input_size=32, resize_size=36)
VIEWS = [TTAView(name="center"), TTAView(name="flip", hflip=True)]
MiB = 2**20


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size=(48, 32), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)))


def job(**kw) -> Job:
    limits = dict(max_pixels=100_000_000, call_pixels=0, max_call_pixels=200_000_000)
    return Job(preprocessing=PREP, views=VIEWS, formats=DEFAULT_FORMATS, **{**limits, **kw})


def never() -> None:
    """A call whose deadline never passes and whose caller stays."""


def gone_after(seconds: float):
    """A check that ends the call `seconds` from now, and records when it first did."""
    end = time.monotonic() + seconds
    seen: list[float] = []

    def check() -> None:
        if time.monotonic() >= end:
            seen.append(time.monotonic())
            raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed")

    check.seen = seen  # type: ignore[attr-defined]
    return check


@functools.cache
def big_png(side: int = 6000, mode: str = "RGB") -> bytes:
    """A PNG that takes a second or more and hundreds of megabytes to decode (RGBA: about 15 bytes a pixel)."""
    ramp = (np.arange(side)[None, :] + np.arange(side)[:, None]).astype(np.uint8)
    return encode(Image.fromarray(np.stack([ramp] * len(mode), -1), mode), compress_level=1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def tiff_tile_bomb(side: int = 64, tile: int = 16384) -> bytes:
    """A valid side x side RGB TIFF whose one deflate tile is tile x tile: ~780 kB that make libtiff
    allocate tile^2 x 3 bytes (768 MiB) before a pixel of the image is read. The header says 4,096 pixels."""
    raw = zlib.compress(bytes(tile * tile * 3), 9)
    bits_at, data_at = 8 + 2 + 12 * 11 + 4, 8 + 2 + 12 * 11 + 4 + 6
    short, long_ = 3, 4
    entries = [  # ImageWidth, ImageLength, BitsPerSample, Compression (deflate), Photometric (RGB), SamplesPerPixel,
        # PlanarConfig, TileWidth, TileLength, TileOffsets, TileByteCounts
        (256, short, 1, side),
        (257, short, 1, side),
        (258, short, 3, bits_at),
        (259, short, 1, 8),
        (262, short, 1, 2),
        (277, short, 1, 3),
        (284, short, 1, 1),
        (322, short, 1, tile),
        (323, short, 1, tile),
        (324, long_, 1, data_at),
        (325, long_, 1, len(raw)),
    ]
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(entries)))
    for tag, kind, count, value in entries:
        inline = kind == short and count == 1
        out += (
            struct.pack("<HHIHH", tag, kind, count, value, 0)
            if inline
            else struct.pack("<HHII", tag, kind, count, value)
        )
    return bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + raw)


def jpeg_segment_flood(megabytes: int = 19) -> bytes:
    """A valid JPEG whose header is padded with millions of empty comment segments (4 bytes each)."""
    valid = encode(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG")
    return valid[:2] + b"\xff\xfe\x00\x02" * (megabytes * MiB // 4) + valid[2:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunk_flood(megabytes: int = 19) -> bytes:
    """A valid PNG with millions of empty private ancillary chunks (12 bytes each) before its pixels."""
    valid = encode(Image.new("RGB", (16, 16), (10, 200, 10)))
    ihdr_end = 8 + 25
    empty = png_chunk(b"prVt", b"")
    return valid[:ihdr_end] + empty * (megabytes * MiB // len(empty)) + valid[ihdr_end:]


@pytest.fixture(scope="module")
def pool():
    with DecodePool(2, 1024 * MiB, timeout_s=30) as p:
        yield p


class TestDecodePool:
    def test_views_equal_the_trainers_in_process_ones(self, pool):
        data = photo()
        decoded = pool.decode(job(), data, never)
        np.testing.assert_array_equal(decoded.views, load_views(data, PREP, VIEWS))
        assert decoded.pixels == 48 * 32

    def test_an_unreadable_image_is_an_image_error_and_the_worker_stays(self, pool):
        before = set(pool.pids)
        with pytest.raises(ImageError, match="not a recognised image format"):
            pool.decode(job(), b"not an image at all", never)
        assert set(pool.pids) == before

    def test_the_calls_pixel_total_is_enforced_in_the_worker(self, pool):
        with pytest.raises(ImageError, match="over the limit of 2000 pixels per call"):
            pool.decode(job(call_pixels=1000, max_call_pixels=2000), photo(), never)

    def test_a_caller_who_leaves_stops_its_decode_within_100_ms(self, pool):
        busy = set(pool.pids)
        check = gone_after(0.3)
        with pytest.raises(CallFailed) as err:
            pool.decode(job(), big_png(), check)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # The wait looks every POLL_S whether the call is over, and kills the worker before it returns.
        [killed] = busy - set(pool.pids)
        wait_for(lambda: not alive(killed))
        assert time.monotonic() - check.seen[0] < 0.1
        wait_for(lambda: len(pool.pids) == 2)  # replaced
        assert pool.decode(job(), photo(), never).pixels == 48 * 32

    def test_an_image_over_the_memory_limit_fails_alone(self, tmp_path):
        replaced: list[str] = []
        with DecodePool(1, 256 * MiB, timeout_s=60, on_replaced=replaced.append) as small:
            with pytest.raises(ItemFailed) as err:
                small.decode(job(), big_png(6000, "RGBA"), never)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--decode-worker-memory-mb" in str(err.value)
            assert replaced == ["memory"]
            wait_for(lambda: len(small.pids) == 1)
            assert small.decode(job(), photo(), never).pixels == 48 * 32

    def test_a_worker_that_dies_fails_only_its_image(self, pool):
        pids, image = set(pool.pids), big_png()
        killer = threading.Timer(0.2, lambda: [os.kill(pid, 9) for pid in pids])
        killer.start()
        try:
            with pytest.raises(ItemFailed) as err:
                pool.decode(job(), image, never)
        finally:
            killer.cancel()
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "decoder crashed" in str(err.value)
        # The idle worker died too: the next image is not blamed for it.
        assert pool.decode(job(), photo(), never).pixels == 48 * 32
        wait_for(lambda: len(pool.pids) == 2 and not pids & set(pool.pids))

    def test_a_decode_past_the_timeout_is_killed(self):
        with DecodePool(1, 512 * MiB, timeout_s=0.2) as p:
            [pid] = p.pids
            with pytest.raises(ItemFailed) as err:
                p.decode(job(), big_png(), never)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "--decode-timeout-s" in str(err.value)
            wait_for(lambda: not alive(pid))

    def test_the_timeout_counts_cpu_time_not_the_clocks(self):
        """A worker that gets no CPU (stopped here, as on an overloaded machine) is not timed out."""
        with DecodePool(1, 512 * MiB, timeout_s=0.3) as p:
            [pid] = p.pids
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(1.0, os.kill, (pid, signal.SIGCONT)).start()
            start = time.monotonic()
            assert p.decode(job(), photo(), never).pixels == 48 * 32
            assert time.monotonic() - start >= 1.0

    def test_closing_ends_decodes_in_flight(self):
        p = DecodePool(1, 512 * MiB, timeout_s=60)
        threading.Timer(0.2, p.close).start()
        start = time.monotonic()
        with pytest.raises(ItemFailed) as err:
            p.decode(job(), big_png(), never)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 0.2 + 0.1 + POLL_S
        assert not alive(p.zygote_pid) or wait_for(lambda: not alive(p.zygote_pid))


def wait_for(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)
    return True


def peak_rss_mb_since_reset() -> float:
    return (
        int(next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")).split()[1])
        / 1024
    )


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    cfg = server_config(tiny_bundle, decode_workers=2)
    with Server(cfg) as srv:
        yield srv


HOSTILE = {
    "tiff tile bomb": tiff_tile_bomb,
    "jpeg segment flood": jpeg_segment_flood,
    "png chunk flood": png_chunk_flood,
}


# One call from a process of its own, as callers are, so that the server's process is all the test's.
CALL = """
import sys, time, grpc
from serving.gen.classifier.v1 import classifier_pb2 as pb, classifier_pb2_grpc as pb_grpc
target, path, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
    grpc.channel_ready_future(channel).result(timeout=30)
    request = pb.PredictRequest(image=open(path, "rb").read())
    start = time.monotonic()
    try:
        pb_grpc.ClassifierStub(channel).Predict(request, timeout=timeout)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    print(code, time.monotonic() - start)
"""


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_images_cost_the_server_process_nothing_and_end_by_the_deadline(server, name, tmp_path):
    """Each is answered (or refused) within the worker's limit and the call's deadline, and the
    server's own process, which never parses image bytes, grows by no more than the request's copies
    (parsing them in-process cost +260 to +770 MB)."""
    path = tmp_path / "image"
    path.write_bytes(HOSTILE[name]())
    deadline = 1.5
    with Client(f"127.0.0.1:{server.port}") as c:
        c.predict(photo())  # every code path warm
    reset_peak_rss()
    base = peak_rss_mb_since_reset()
    caller = subprocess.run(
        [sys.executable, "-c", CALL, f"127.0.0.1:{server.port}", str(path), str(deadline)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    grew = peak_rss_mb_since_reset() - base
    code, took = caller.stdout.split()
    # The floods are valid images under --max-image-bytes: they reach the decoder, which parses them for
    # seconds. The tile bomb is valid too, and its tile fits the default limit.
    assert code in ("OK", "DEADLINE_EXCEEDED"), caller.stdout
    assert float(took) < deadline + 0.5
    # gRPC's buffers, the serialized and parsed message, its image field: five copies of the request.
    assert grew < 5 * path.stat().st_size / MiB + 30, f"{name}: the server's process grew {grew:.0f} MB"
    with Client(f"127.0.0.1:{server.port}") as c:
        assert c.predict(photo()).predictions  # and the server still serves


def test_a_tile_bomb_over_the_workers_limit_is_refused(tiny_bundle):
    cfg = server_config(tiny_bundle, decode_workers=1, max_image_pixels=1_000_000, decode_worker_memory_mb=400)
    with Server(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        results = c.predict_batch([photo(), tiff_tile_bomb(), photo(seed=2)]).results
        assert [r.status.code for r in results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
        assert "corrupt" in results[1].status.message
        assert c.predict(photo()).predictions


def test_the_server_stops_its_workers(tiny_bundle):
    cfg = server_config(tiny_bundle, decode_workers=2)
    srv = Server(cfg)
    pids = [*srv.calls.decoders.pids, srv.calls.decoders.zygote_pid]
    assert all(alive(pid) for pid in pids)
    srv.stop(0)
    wait_for(lambda: not any(alive(pid) for pid in pids))


def test_stopping_ends_a_decode_that_has_no_deadline(tiny_bundle):
    """A call without a deadline decoding a slow image does not hold up shutdown past the grace."""
    cfg = server_config(tiny_bundle, decode_timeout_s=60)
    image = jpeg_segment_flood()  # seconds of header parsing
    srv = Server(cfg)
    outcome: list[grpc.StatusCode] = []

    def call() -> None:
        with Client(f"127.0.0.1:{srv.port}", timeout=None) as c:
            try:
                c.predict(image)
                outcome.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                outcome.append(e.code())

    caller = threading.Thread(target=call)
    caller.start()
    wait_for(lambda: srv.calls.admission._active == 1)
    time.sleep(0.2)  # decoding by now
    start = time.monotonic()
    srv.stop(0.5)
    assert time.monotonic() - start < 0.5 + 1.0
    caller.join(10)
    assert outcome == [grpc.StatusCode.UNAVAILABLE]
