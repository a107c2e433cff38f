"""Unusual and hostile images over the wire: each gets its documented status and the server keeps serving.

Documented statuses: an image the server can read (any mode, any size from 1x1, EXIF-rotated) is
answered; empty, undecodable, truncated, too many bytes or too many pixels is INVALID_ARGUMENT with
a message saying which; a request message over max_message_bytes is refused by gRPC itself with
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
from conftest import server_config
from PIL import Image, ImageOps

from serving.client import Client
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.server import Server

MAX_IMAGE_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 256 * 1024


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size=(48, 32), seed=0) -> Image.Image:
    """Noise over a left-to-right gradient: not symmetric, so a rotation changes what the model sees."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.3, 0.1])
    a = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: about 50 kB that would decode to 400 megapixels."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored landscape pixels are to be shown turned 90 degrees clockwise
    return encode(photo(), "JPEG", exif=exif.tobytes(), quality=95)


GOOD = {
    "grayscale JPEG": lambda: encode(photo().convert("L"), "JPEG"),
    "CMYK JPEG": lambda: encode(photo().convert("CMYK"), "JPEG"),
    "RGBA PNG": lambda: encode(photo().convert("RGBA"), "PNG"),
    "16-bit PNG": lambda: encode(Image.fromarray(np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40), "PNG"),
    "1x1 PNG": lambda: encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "EXIF-rotated JPEG": exif_rotated,
    "palette GIF": lambda: encode(photo().convert("P"), "GIF"),
    "WebP": lambda: encode(photo(), "WEBP"),
    "BMP": lambda: encode(photo(), "BMP"),
}

BAD = {
    "empty": (lambda: b"", "empty image"),
    "random bytes": (lambda: np.random.default_rng(0).bytes(2000), "not a recognised image format"),
    "truncated JPEG": (lambda: encode(photo((256, 256)), "JPEG")[:600], "corrupt or truncated image"),
    # Over PIL's own hard limit (2 x 89 megapixels), which refuses it while opening: the message names ours...
    "decompression bomb": (decompression_bomb, "image is 400000000 pixels, over the limit of 50000000"),
    # ... and under it but over the server's max_image_pixels.
    "too many pixels": (
        lambda: decompression_bomb(10_000),
        "image is 10000x10000 = 100000000 pixels, over the limit of 50000000",
    ),
    "too many bytes": (lambda: encode(photo((200, 200)), "PNG"), f"over the limit of {MAX_IMAGE_BYTES}"),
}


@pytest.fixture(scope="module")
def server(tiny_bundle):
    cfg = server_config(tiny_bundle, max_image_bytes=MAX_IMAGE_BYTES, max_message_bytes=MAX_MESSAGE_BYTES)
    with Server(cfg) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def assert_still_serving(client) -> None:
    assert client.predict(encode(photo(seed=9), "PNG")).predictions


@pytest.mark.parametrize("kind", GOOD)
def test_unusual_but_valid_images_are_answered(kind, client):
    reply = client.predict(GOOD[kind]())
    assert len(reply.probabilities) == 2 and abs(sum(reply.probabilities) - 1) < 1e-5


@pytest.mark.parametrize("kind", BAD)
def test_bad_images_are_invalid_argument_and_the_server_keeps_serving(kind, client):
    make, message = BAD[kind]
    with pytest.raises(grpc.RpcError) as err:
        client.predict(make())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert_still_serving(client)


def test_a_message_over_the_limit_is_resource_exhausted_from_grpc(client):
    with pytest.raises(grpc.RpcError) as err:
        client.predict(b"\xff" * (MAX_MESSAGE_BYTES + 1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()
    assert_still_serving(client)


def test_exif_orientation_is_applied_before_the_views(client):
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(exif_rotated())))
    assert upright.size == (32, 48)
    as_sent = client.predict(exif_rotated()).probabilities
    np.testing.assert_allclose(as_sent, client.predict(encode(upright, "PNG")).probabilities, atol=1e-6)


def test_one_batch_holding_the_whole_matrix(client):
    images = [make() for make in GOOD.values()] + [make() for make, _ in BAD.values()]
    results = client.predict_batch(images).results
    assert [r.status.code for r in results] == [0] * len(GOOD) + [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * len(BAD)
    for r, (_, message) in zip(results[len(GOOD) :], BAD.values(), strict=True):
        assert message in r.status.message


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_664_byte_strip_is_answered_with_bounded_memory(client):
    strip = encode(Image.new("L", (1, 300_000), 128), "PNG")
    assert len(strip) < 1000
    before = peak_rss_mb()
    assert client.predict(strip).predictions
    # Resized whole, its shorter side up to the bundle's 37 px, it would be 37 x 11,100,000 pixels (1.6 GB).
    assert peak_rss_mb() - before < 150


def test_formats_outside_the_list_are_refused_by_name(client):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    with pytest.raises(grpc.RpcError) as err:
        client.predict(eps)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "EPS images are not accepted; use one of JPEG, PNG, WEBP, BMP, GIF, TIFF" in err.value.details()


def test_an_eps_that_ghostscript_would_render_is_refused(client):
    import shutil

    if shutil.which("gs") is None:
        pytest.skip("no Ghostscript (Debian's ghostscript package): without it Pillow cannot decode EPS anyway")
    eps = encode(photo(), "EPS")
    Image.open(io.BytesIO(eps)).load()  # Ghostscript renders it: a server that let it through would answer
    with pytest.raises(grpc.RpcError) as err:
        client.predict(eps)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "EPS images are not accepted" in err.value.details()


def test_the_format_list_is_configurable(tiny_bundle):
    cfg = server_config(tiny_bundle, allowed_formats="png, webp")
    with Server(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        assert c.predict(encode(photo(), "WEBP")).predictions
        with pytest.raises(grpc.RpcError) as err:
            c.predict(encode(photo(), "JPEG"))
        assert "JPEG images are not accepted; use one of PNG, WEBP" in err.value.details()


def test_pixels_per_call_are_bounded(tiny_bundle):
    cfg = server_config(tiny_bundle, max_image_pixels=48 * 32, max_call_pixels=2 * 48 * 32)
    with Server(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        results = c.predict_batch([encode(photo(seed=i), "PNG") for i in range(3)]).results
        assert [r.status.code for r in results] == [0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        assert "over the limit of 3072 pixels per call; send it in another call" in results[2].status.message


# One image failing alone for a reason of the server's (its decoder out of memory or crashed) is
# tested with real limits and real worker deaths in tests/serving/test_serving_decoders.py.


def test_decoding_stops_at_the_deadline(tiny_bundle):
    """A PredictBatch of images that take seconds to decode in all: once the deadline passes, the
    server stops decoding rather than finishing the lot for a caller who is gone."""
    side = 3000
    ramp = (np.arange(side)[None, :] + np.arange(side)[:, None]).astype(np.uint8)
    big = encode(Image.fromarray(np.stack([ramp] * 3, -1)), "PNG", compress_level=1)
    cfg = server_config(tiny_bundle, max_call_pixels=10**10)
    with Server(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=120) as c:
        start = time.monotonic()
        assert c.predict(big).predictions
        one = time.monotonic() - start  # decoding one image, plus a model run
        images = 24

        def handled(code: str) -> float:
            return (
                srv.metrics.registry.get_sample_value(
                    "classifier_requests_total", {"method": "PredictBatch", "code": code}
                )
                or 0
            )

        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.stub.PredictBatch(
                pb.PredictBatchRequest(requests=[pb.PredictRequest(image=big)] * images), timeout=2 * one
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while handled("DEADLINE_EXCEEDED") < 1:
            assert time.monotonic() - start < images * one * 3, "the handler never finished"
            time.sleep(0.01)
        took = time.monotonic() - start
        # Decoding everything takes about `images * one`; stopping at the deadline, about 3 x one.
        assert took < images * one / 3, f"the handler ran {took:.2f}s past a {2 * one:.2f}s deadline"
