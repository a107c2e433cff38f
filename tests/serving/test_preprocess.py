"""serving.bundle.preprocess: decoding, orientation, modes and deterministic views, on real encoded files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.bundle.manifest import CENTER, Preprocessing, TTAView
from serving.bundle.preprocess import (
    MAX_ASPECT_RATIO,
    ImageError,
    cap_aspect_ratio,
    crop_box,
    decode_image,
    load_views,
    make_views,
    resize_shorter,
)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    """An image whose every pixel says where it is: red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


PREP = Preprocessing(input_size=32, resize_size=40)


class TestDecode:
    @pytest.mark.parametrize(
        "mode, fmt",
        [
            ("L", "PNG"),
            ("RGBA", "PNG"),
            ("P", "PNG"),
            ("CMYK", "JPEG"),
            ("RGB", "JPEG"),
            ("RGB", "BMP"),
            ("RGB", "WEBP"),
        ],
    )
    def test_any_mode_becomes_rgb(self, mode, fmt):
        im = decode_image(encode(gradient(20, 10).convert(mode), fmt))
        assert im.mode == "RGB" and im.size == (20, 10)

    def test_transparent_pixels_become_white(self):
        rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
        assert np.asarray(decode_image(encode(rgba))).min() == 255

    def test_16_bit_png_is_scaled_not_clipped(self):
        a = np.full((4, 4), 65535, np.uint16)
        a[0, 0] = 0
        im = decode_image(encode(Image.fromarray(a)))
        px = np.asarray(im)
        assert px[1, 1].tolist() == [255, 255, 255] and px[0, 0].tolist() == [0, 0, 0]

    def test_exif_orientation_is_applied(self):
        im = gradient(30, 20)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to view": the stored landscape pixels are shown portrait
        upright = decode_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95))
        assert upright.size == (20, 30)

    @pytest.mark.parametrize(
        "data, message",
        [
            (b"", "empty"),
            (b"not an image at all", "not a recognised image"),
            (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "corrupt|not a recognised"),
        ],
    )
    def test_bad_bytes_are_image_errors(self, data, message):
        with pytest.raises(ImageError, match=message):
            decode_image(data)

    def test_truncated_jpeg(self):
        data = encode(gradient(64, 64), "JPEG")
        with pytest.raises(ImageError, match="corrupt or truncated"):
            decode_image(data[: len(data) // 2])

    def test_pixel_limit_is_checked_before_decoding(self):
        data = encode(Image.new("L", (3000, 3000)))
        with pytest.raises(ImageError, match="over the limit"):
            decode_image(data, max_pixels=1_000_000)


class TestViews:
    def test_shape_dtype_and_determinism(self):
        views = [CENTER, TTAView(name="hflip", hflip=True), TTAView(name="zoom", zoom=1.25, anchor="top_left")]
        data = encode(gradient(80, 50))
        a, b = load_views(data, PREP, views), load_views(data, PREP, views)
        assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)

    def test_hflip_mirrors_the_centre_view(self):
        out = make_views(gradient(80, 50), PREP, [CENTER, TTAView(name="h", hflip=True)])
        assert np.array_equal(out[1], out[0][:, ::-1])

    def test_rot90_and_vflip(self):
        out = make_views(gradient(50, 50), PREP, [CENTER, TTAView(name="r", rot90=1), TTAView(name="v", vflip=True)])
        assert np.array_equal(out[1], np.rot90(out[0]))
        assert np.array_equal(out[2], out[0][::-1])

    def test_centre_crop_of_a_wide_image_keeps_the_middle(self):
        # 80x50 -> shorter side 40 -> 64x40; the centre 32x32 starts at x=16, y=4.
        assert crop_box(64, 40, 32, "center") == (16, 4, 48, 36)
        assert crop_box(64, 40, 32, "bottom_right") == (32, 8, 64, 40)

    def test_one_pixel_image(self):
        out = load_views(encode(Image.new("RGB", (1, 1), (10, 20, 30))), PREP, [CENTER])
        assert out.shape == (1, 32, 32, 3) and (out[0] == [10, 20, 30]).all()


class TestWorkIsBounded:
    """Whatever an image's shape or format, the work it costs after decoding has a ceiling."""

    @pytest.mark.parametrize("size", [(1, 5_000), (5_000, 1), (3, 400), (1000, 99)])
    def test_a_thin_strip_is_cut_before_it_is_resized(self, size):
        out = resize_shorter(Image.new("L", size, 7), 256)
        assert min(out.size) == 256 and max(out.size) <= MAX_ASPECT_RATIO * 256

    def test_images_within_the_ratio_are_resized_whole(self):
        im = gradient(MAX_ASPECT_RATIO * 20, 20)
        assert cap_aspect_ratio(im) is im
        assert resize_shorter(im, 40).size == (MAX_ASPECT_RATIO * 40, 40)

    def test_the_middle_of_a_strip_is_kept(self):
        strip = gradient(1000, 10)
        np.testing.assert_array_equal(np.asarray(cap_aspect_ratio(strip)), np.asarray(strip)[:, 450:550])

    def test_a_one_pixel_high_panorama_makes_views(self):
        out = load_views(encode(Image.new("L", (1, 300_000), 90)), PREP, [CENTER])
        assert out.shape == (1, 32, 32, 3) and (out == 90).all()

    def test_admit_is_told_the_pixels_before_any_is_decoded(self):
        seen = []

        def admit(pixels):
            seen.append(pixels)
            raise ImageError("refused")

        with pytest.raises(ImageError, match="refused"):
            load_views(encode(gradient(30, 20)), PREP, [CENTER], admit=admit)
        assert seen == [600]


def eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"


class TestFormats:
    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
    def test_the_default_formats_are_accepted(self, fmt):
        assert decode_image(encode(gradient(20, 10), fmt)).size == (20, 10)

    @pytest.mark.parametrize(
        "data, name",
        [
            (eps(), "EPS"),
            (encode(gradient(20, 10), "TGA"), None),  # TGA has no signature: a guess by its first bytes, or none
            (encode(gradient(20, 10), "PCX"), "PCX"),
            (encode(gradient(20, 10), "ICO"), "ICO"),
            (encode(gradient(20, 10), "PPM"), "PPM"),
        ],
    )
    def test_other_formats_are_refused_by_name_without_being_parsed(self, data, name):
        message = f"{name} images are not accepted" if name else "images are not accepted|not a recognised image format"
        with pytest.raises(ImageError, match=message):
            decode_image(data)

    def test_the_list_is_the_callers(self):
        with pytest.raises(ImageError, match="JPEG images are not accepted; use one of PNG"):
            decode_image(encode(gradient(20, 10), "JPEG"), formats=("PNG",))

    def test_a_camera_jpeg_with_a_second_picture_is_a_jpeg(self):
        im = gradient(20, 10)
        buf = io.BytesIO()
        im.save(buf, "MPO", save_all=True, append_images=[im])
        assert decode_image(buf.getvalue()).size == (20, 10)
