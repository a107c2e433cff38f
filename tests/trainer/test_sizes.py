"""trainer.data.sizes: size statistics from image headers, and the histogram PNG."""

from __future__ import annotations

import pytest
from PIL import Image

from trainer.data.sizes import image_size_stats, plot_size_histogram

# (width, height): widths 10..90 and heights 20..100 in steps of 20, one repeated size.
SIZES = [(10, 20), (30, 40), (50, 60), (70, 80), (90, 100), (30, 40)]


@pytest.fixture
def files(tmp_path):
    out = []
    for i, (w, h) in enumerate(SIZES):
        path = tmp_path / f"im{i}.{'jpg' if i % 2 else 'png'}"
        Image.new("RGB", (w, h), (i, 0, 0)).save(path)
        out.append(path)
    return out


class TestStats:
    def test_known_sizes(self, files):
        stats = image_size_stats(files)
        assert stats["count"] == 6 and stats["errors"] == []
        # widths 10, 30, 30, 50, 70, 90: numpy's linear percentiles
        assert stats["width"] == {
            "min": 10,
            "median": 40.0,
            "p5": 15.0,
            "p25": 30.0,
            "p50": 40.0,
            "p75": 65.0,
            "p95": 85.0,
            "max": 90,
        }
        assert stats["height"]["min"] == 20 and stats["height"]["max"] == 100 and stats["height"]["median"] == 50.0
        assert stats["col_counts"] == {10: 1, 30: 2, 50: 1, 70: 1, 90: 1}
        assert stats["row_counts"] == {20: 1, 40: 2, 60: 1, 80: 1, 100: 1}

    def test_reads_headers_only(self, tmp_path):
        # Pixel data cut off: decoding would fail, the header still gives the size.
        path = tmp_path / "cut.png"
        Image.new("RGB", (300, 200)).save(path)
        path.write_bytes(path.read_bytes()[:100])
        stats = image_size_stats([path])
        assert stats["count"] == 1 and stats["col_counts"] == {300: 1} and stats["row_counts"] == {200: 1}

    def test_exif_orientation_gives_the_upright_size(self, tmp_path):
        exif = Image.Exif()
        exif[0x0112] = 6  # stored landscape, shown portrait
        path = tmp_path / "phone.jpg"
        Image.new("RGB", (40, 30)).save(path, exif=exif.tobytes())
        assert image_size_stats([path])["col_counts"] == {30: 1}

    @pytest.mark.parametrize(
        "name, content, message",
        [
            ("notes.jpg", b"hello", "not a readable image"),
            ("empty.png", b"", "not a readable image"),
            ("gone.png", None, "cannot read"),
        ],
    )
    def test_unreadable_files_are_reported_not_raised(self, files, tmp_path, name, content, message):
        bad = tmp_path / name
        if content is not None:
            bad.write_bytes(content)
        stats = image_size_stats([*files, bad])
        assert stats["count"] == len(files)
        [(path, error)] = stats["errors"]
        assert path == bad and message in error

    def test_no_files(self):
        stats = image_size_stats([])
        assert stats["count"] == 0 and stats["width"] is None and stats["col_counts"] == {}


class TestHistogram:
    @pytest.mark.parametrize("from_stats", [True, False])
    def test_writes_a_valid_png(self, files, tmp_path, from_stats):
        source = image_size_stats(files) if from_stats else files
        out = plot_size_histogram(source, tmp_path / "plots" / "sizes.png")
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] > 100
            im.verify()
        assert [p.name for p in out.parent.iterdir()] == ["sizes.png"]  # no temporary left beside it

    def test_nothing_readable(self, tmp_path):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"x")
        with pytest.raises(ValueError, match=r"no readable images .*1 unreadable"):
            plot_size_histogram([bad], tmp_path / "sizes.png")
        assert not (tmp_path / "sizes.png").exists()
