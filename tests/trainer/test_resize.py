"""trainer.data.resize and ImageClassifierData.resize: the resized-image cache, where it goes, its reuse
and every way it must notice it is stale."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import trainer.data.resize
from serving.bundle.preprocess import decode_image, resize_shorter
from trainer.config import RunConfig
from trainer.data.augment import tfms_from_model
from trainer.data.loaders import DataError, ImageClassifierData
from trainer.data.resize import INDEX_NAME, ResizeError, cache_dir, resize_images
from trainer.data.workdir import default_work_dir

TARGET = 24


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# (relative path, width, height): large landscape and portrait images in both formats, and one
# already smaller than the target.
IMAGES = [
    ("train/ants/a1.png", 64, 40),
    ("train/ants/a2.jpg", 30, 50),
    ("train/bees/b1.png", 40, 72),
    ("train/bees/small.png", 20, 16),
    ("valid/ants/a3.jpg", 48, 48),
    ("valid/bees/b2.png", 50, 30),
]


@pytest.fixture
def data(tmp_path) -> ImageClassifierData:
    root = tmp_path / "data"
    for i, (rel, w, h) in enumerate(IMAGES):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        noise(w, h, i).save(root / rel)
    return ImageClassifierData.from_paths(root, tfms_from_model("efficientnet_lite0", 16), num_workers=0)


def resize(data: ImageClassifierData, target=TARGET, **kw) -> ImageClassifierData:
    return data.resize(target, **kw)


def cached_files(data):
    return data.trn_files + data.val_files


def stamps(files):
    """(inode, mtime in ns) of each file: a rewrite by rename always gets a new inode."""
    return {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files}


def pixels(path):
    return np.asarray(decode_image(path.read_bytes()))


class TestResize:
    def test_files_mirror_the_sources_under_tmp_target(self, data):
        small = resize(data)
        cache = data.path.resolve() / "tmp" / str(TARGET)
        assert cache_dir(data.path, TARGET) == cache
        assert [cache / f.relative_to(data.path) for f in data.trn_files] == small.trn_files
        assert [cache / f.relative_to(data.path) for f in data.val_files] == small.val_files
        assert (small.classes, small.trn_y, small.val_y, small.path, small.tfms) == (
            data.classes,
            data.trn_y,
            data.val_y,
            data.path,
            data.tfms,
        )
        assert (cache / INDEX_NAME).is_file()

    def test_shorter_side_is_target_with_the_serving_resize(self, data):
        small = resize(data)
        for src, dst in zip(cached_files(data), cached_files(small), strict=True):
            original = decode_image(src.read_bytes())
            expected = resize_shorter(original, TARGET) if min(original.size) > TARGET else original
            with Image.open(dst) as out:
                assert out.size == expected.size and min(out.size) == min(TARGET, *original.size)
            if src.suffix == ".png":  # lossless: the very pixels the serving resize makes
                assert np.array_equal(pixels(dst), np.asarray(expected))

    def test_smaller_images_are_copied_not_upscaled(self, data):
        small = resize(data)
        src = data.path / "train/bees/small.png"
        assert (cache_dir(small.path, TARGET) / "train/bees/small.png").read_bytes() == src.read_bytes()

    @pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".png", "PNG")])
    def test_format_follows_the_extension(self, data, suffix, fmt):
        for f in cached_files(resize(data)):
            if f.suffix == suffix:
                with Image.open(f) as im:
                    assert im.format == fmt

    def test_exif_orientation_is_applied_before_resizing(self, data):
        exif = Image.Exif()
        exif[0x0112] = 6  # stored landscape, shown portrait
        src = data.path / "train/ants/a2.jpg"
        noise(60, 40, 9).save(src, exif=exif.tobytes(), quality=95)
        with Image.open(resize(data).trn_files[data.trn_files.index(src)]) as im:
            assert im.size == (TARGET, 36)

    def test_method_maps_the_files_through_resize_images(self, data):
        files = [*data.trn_files, *data.val_files]
        copies = resize_images(files, data.path, TARGET, tmp_name="small")
        assert list(copies) == files
        small = data.resize(TARGET, "small")
        assert small.trn_files + small.val_files == [copies[f] for f in files]

    def test_test_files_are_resized_too(self, data):
        (data.path / "test").mkdir()
        noise(80, 60, 5).save(data.path / "test" / "t.png")
        data.test_files = [data.path / "test" / "t.png"]
        with Image.open(resize(data).test_files[0]) as im:
            assert im.size == (32, TARGET)

    @pytest.mark.parametrize("target", [0, -5, 2.5, True])
    def test_target_must_be_positive_pixels(self, data, target):
        with pytest.raises(ValueError, match="positive number of pixels"):
            resize(data, target)


class TestTrainingFromTheCache:
    """`trainer run --resize`: RunConfig.resize and ImageClassifierData.resized."""

    def test_resized_is_resize_at_or_above_the_training_size(self, data):
        assert data.resized(TARGET) == data.resize(TARGET)
        assert data.tfms.sz == 16 and data.resized(16) == data.resize(16)

    def test_resized_below_the_training_size_names_both(self, data):
        with pytest.raises(DataError, match=r"resize target 12 px is smaller than the training size 16 px"):
            data.resized(12)

    @pytest.mark.parametrize(
        "kw, largest", [({"size": 224}, 224), ({"sizes": "128,224"}, 224), ({"size": 64, "sizes": [32, 48]}, 48)]
    )
    def test_config_resize_below_the_largest_size_names_both(self, kw, largest):
        with pytest.raises(
            ValueError, match=rf"resize {largest - 1} px is smaller than the training size {largest} px"
        ):
            RunConfig(resize=largest - 1, **kw)
        assert RunConfig(resize=largest, **kw).resize == largest

    def test_config_resize_is_off_by_default(self):
        assert RunConfig().resize is None


class TestReadOnlyDataFolder:
    """A shared dataset (mode 0o555) is never written to, not even by root, whom os.access lets write."""

    @pytest.fixture
    def read_only(self, data, tmp_path, monkeypatch):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        folders = [data.path, *(p for p in data.path.rglob("*") if p.is_dir())]
        for folder in folders:
            folder.chmod(0o555)
        yield data
        for folder in folders:
            folder.chmod(0o755)

    def test_copies_go_to_the_user_cache_and_nothing_under_the_data_folder(self, read_only, tmp_path):
        before = sorted(read_only.path.rglob("*"))
        small = resize(read_only)
        assert sorted(read_only.path.rglob("*")) == before
        cache = cache_dir(read_only.path, TARGET)
        assert cache == default_work_dir(read_only.path) / "tmp" / str(TARGET)
        assert cache.is_relative_to(tmp_path / "cache" / "lesson2-classifier")
        assert small.trn_files + small.val_files == [
            cache / f.relative_to(read_only.path) for f in cached_files(read_only)
        ]
        assert all(f.is_file() for f in cached_files(small)) and (cache / INDEX_NAME).is_file()


class TestCacheReuse:
    def test_second_call_rewrites_nothing(self, data):
        first = resize(data)
        index = cache_dir(data.path, TARGET) / INDEX_NAME
        before = stamps([*cached_files(first), index])
        second = resize(data)
        assert second == first and stamps([*cached_files(second), index]) == before

    def test_changed_source_is_remade(self, data):
        first = resize(data)
        src = data.path / "train/ants/a1.png"
        dst = first.trn_files[data.trn_files.index(src)]
        old_pixels, st = pixels(dst), src.stat()
        noise(64, 40, 99).save(src)  # same size on disk, different pixels
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        others = stamps([f for f in cached_files(first) if f != dst])
        resize(data)
        assert not np.array_equal(pixels(dst), old_pixels)
        assert np.array_equal(pixels(dst), np.asarray(resize_shorter(decode_image(src.read_bytes()), TARGET)))
        assert stamps(list(others)) == others

    @pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite"])
    def test_damaged_cache_file_is_remade(self, data, damage):
        first = resize(data)
        dst = first.val_files[0]
        good = dst.read_bytes()
        if damage == "truncate":
            dst.write_bytes(good[: len(good) // 2])
        elif damage == "delete":
            dst.unlink()
        else:  # same length, other bytes, a nearly equal mtime: only the mtime tells
            st = dst.stat()
            dst.write_bytes(bytes(len(good)))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        others = stamps(cached_files(first)[: -len(first.val_files)] + first.val_files[1:])
        resize(data)
        assert dst.read_bytes() == good
        assert stamps(list(others)) == others

    @pytest.mark.parametrize("text", ['{"format": 1, "target": 24, "fi', "", "\xff not json", "[]"])
    def test_damaged_index_remakes_everything(self, data, text, caplog):
        first = resize(data)
        index = cache_dir(data.path, TARGET) / INDEX_NAME
        index.write_text(text, encoding="latin-1")
        before = stamps(cached_files(first))
        resize(data)
        after = stamps(cached_files(first))
        assert all(after[f][0] != before[f][0] for f in before)
        assert set(json.loads(index.read_text())["files"]) == {
            str(f.relative_to(data.path)) for f in cached_files(data)
        }
        assert "resize cache index" in caplog.text

    def test_other_interpolation_remakes_everything(self, data):
        first = resize(data)
        before = stamps(cached_files(first))
        resize(data.with_tfms(tfms_from_model("x", 16, interpolation="bicubic")), TARGET)
        assert all(stamps(cached_files(first))[f][0] != before[f][0] for f in before)

    def test_other_target_is_another_cache(self, data):
        a, b = resize(data), resize(data, 32)
        assert a.trn_files[0].parent != b.trn_files[0].parent
        with Image.open(b.trn_files[0]) as im:
            assert min(im.size) == 32


class TestInterrupted:
    def test_interrupted_run_leaves_only_valid_files_and_resumes(self, data, monkeypatch):
        real_encode, calls = trainer.data.resize._encode, []

        def encode_then_crash(im, fmt):
            calls.append(fmt)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_encode(im, fmt)

        monkeypatch.setattr(trainer.data.resize, "_encode", encode_then_crash)
        with pytest.raises(KeyboardInterrupt):
            resize(data, workers=1)
        cache = cache_dir(data.path, TARGET)
        assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
        entries = json.loads((cache / INDEX_NAME).read_text())["files"]
        assert 0 < len(entries) < len(IMAGES)
        recorded = stamps([cache / rel for rel in entries])

        monkeypatch.setattr(trainer.data.resize, "_encode", real_encode)
        small = resize(data, workers=1)
        assert stamps(list(recorded)) == recorded  # what the index vouched for is reused
        for f in cached_files(small):
            decode_image(f.read_bytes())


class TestErrors:
    def test_unreadable_source_is_named_after_the_others_are_cached(self, data):
        bad = data.path / "train/ants/a1.png"
        bad.write_bytes(b"not an image")
        with pytest.raises(
            ResizeError, match=r"1 of 6 images could not be resized \(.*a1\.png: not a recognised image"
        ):
            resize(data)
        cache = cache_dir(data.path, TARGET)
        entries = json.loads((cache / INDEX_NAME).read_text())["files"]
        assert len(entries) == 5 and "train/ants/a1.png" not in entries

    def test_file_outside_the_data_folder(self, data, tmp_path):
        outside = tmp_path / "elsewhere.png"
        noise(30, 30, 1).save(outside)
        data.trn_files = [*data.trn_files, outside]
        data.trn_y = [*data.trn_y, 0]
        with pytest.raises(ResizeError, match=r"elsewhere.png: not under the data folder"):
            resize(data)

    def test_source_symlinked_from_outside_keeps_its_place(self, data, tmp_path):
        outside = tmp_path / "photo.png"
        noise(30, 60, 2).save(outside)
        link = data.path / "train/ants/linked.png"
        link.symlink_to(outside)
        data.trn_files = [*data.trn_files, link]
        data.trn_y = [*data.trn_y, 0]
        small = resize(data)
        assert small.trn_files[-1] == cache_dir(data.path, TARGET) / "train/ants/linked.png"
        assert not small.trn_files[-1].is_symlink()
