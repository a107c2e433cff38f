"""The data check (trainer.audit): every unreadable file of a dirty folder reported in one go, by
`trainer verify` and before `trainer run` trains; --skip-bad; each warning on data made to trigger
it, and none on clean data; --exclude."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import photo, write_colour_dataset
from PIL import Image

from trainer.audit.check import check, checked_config
from trainer.audit.duplicates import duplicate_groups
from trainer.audit.scan import scan_image
from trainer.config import RunConfig
from trainer.data.assemble import make_data, read_exclude
from trainer.data.loaders import DataError

TRAINER = shutil.which("trainer")
# Small limits keep the dirty folder small: its "huge" PNG is over this many pixels.
MAX_PIXELS = "1000000"
# The files training cannot use, and a word of the reason each gets.
BAD = {
    "train/red/empty.jpg": "empty file",
    "train/red/notes.jpg": "a text file",
    "train/blue/page.jpg": "an HTML page",
    "train/blue/huge.png": "--max-pixels",
    "valid/blue/truncated.jpg": "truncated",
}


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def write_dirty_dataset(root: Path) -> Path:
    """The colour dataset plus what real folders hold: unreadable files (BAD), the readable oddities
    training handles (CMYK, 16-bit, palette transparency, grey + alpha, a 3000 x 1 strip, an animated
    GIF, an EXIF-rotated photo, a unicode name), system files, a .heic, and a class of one image."""
    write_colour_dataset(root, {"train": 8, "valid": 4})
    red, blue = root / "train" / "red", root / "train" / "blue"
    (red / "empty.jpg").write_bytes(b"")
    (red / "notes.jpg").write_text("shopping list\nmilk\n")
    (blue / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    (blue / "huge.png").write_bytes(png(Image.new("L", (1200, 900), 128)))
    whole = jpeg(photo(1))
    (root / "valid" / "blue" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (red / "cmyk.jpg").write_bytes(jpeg(photo(2).convert("CMYK")))
    (red / "deep.png").write_bytes(png(Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16))))
    (red / "palette.png").write_bytes(png(photo(3, (40, 30)).convert("P"), transparency=0))
    (blue / "grey_alpha.png").write_bytes(png(photo(4, (40, 30)).convert("LA")))
    (blue / "strip.png").write_bytes(png(Image.new("RGB", (3000, 1), (40, 60, 200))))
    frames = [photo(5, (40, 30)), photo(6, (40, 30))]
    frames[0].save(blue / "animated.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    (red / "rotated.jpg").write_bytes(jpeg(photo(7, (40, 30)), exif=exif))
    (red / "café-ünïcode.png").write_bytes(png(photo(8, (40, 30))))
    (red / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (blue / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (blue / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    for split, shade in (("train", 200), ("valid", 190)):
        (root / split / "green").mkdir()
        (root / split / "green" / "only.png").write_bytes(png(Image.new("RGB", (40, 30), (40, shade, 60))))
    return root


def trainer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([TRAINER, *map(str, args)], capture_output=True, text=True, timeout=600, check=False)


needs_cli = pytest.mark.skipif(not TRAINER, reason="console script not installed (pip install -e .)")


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> Path:
    return write_dirty_dataset(tmp_path_factory.mktemp("dirty") / "photos")


def config(data: Path, tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(data=data, out=tmp_path / "run", size=32, num_workers=0, **kw)


@needs_cli
def test_verify_reports_every_unreadable_file_at_once(dirty, tmp_path):
    proc = trainer("verify", "--data", dirty, "--size", "32", "--max-pixels", MAX_PIXELS)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    for name, reason in BAD.items():
        assert any(line.startswith(f"  {name}: ") and reason in line for line in lines), (name, proc.stdout)
    assert len([line for line in lines if line.startswith("  ")]) == len(BAD), proc.stdout
    total = sum(1 for p in dirty.rglob("*") if p.is_file() and p.suffix in {".jpg", ".png", ".gif"})
    assert (
        f"trainer: 5 of {total} images cannot be read (train: blue 2, red 2; valid: blue 1); fix or remove them"
        in proc.stderr
    )
    assert "--skip-bad" in proc.stderr and "Traceback" not in proc.stderr
    assert "request" not in proc.stdout  # the reader speaks of files
    # The readable oddities are not problems; the system files are not mentioned at all.
    for name in ("cmyk", "deep", "palette", "grey_alpha", "animated", "rotated", "café", "DS_Store", "Thumbs"):
        assert name not in "\n".join(line for line in lines if not line.startswith("warning")), name


@needs_cli
def test_run_stops_before_precompute_and_skip_bad_trains_without_them(dirty, tmp_path):
    flags = ("--data", dirty, "--size", "32", "--bs", "4", "--num-workers", "0", "--max-pixels", MAX_PIXELS)
    short = ("--lr", "0.01", "--head-epochs", "1", "--aug-cycles", "0", "--unfreeze-cycles", "0")
    stopped = trainer("run", *flags, *short, "--out", tmp_path / "stopped")
    assert stopped.returncode == 2
    assert all(name in stopped.stdout for name in BAD), stopped.stdout
    assert "cannot be read" in stopped.stderr and "--skip-bad" in stopped.stderr
    assert "precompute" not in stopped.stdout + stopped.stderr
    assert not (tmp_path / "stopped" / "tmp").exists()

    run = tmp_path / "skipped"
    done = trainer("run", *flags, *short, "--out", run, "--skip-bad")
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = json.loads((run / "config.json").read_text())["skipped"]
    assert {name: why.split(":")[0] for name, why in skipped.items()}.keys() == BAD.keys()
    report = (run / "report.html").read_text()
    assert "Left out of training and validation (--skip-bad)" in report
    assert all(name in report for name in BAD)
    assert "Check the data:" in report and "green (1)" in report  # the warnings, at the top
    check_file = json.loads((run / "data_check.json").read_text())
    assert check_file["classes"]["train"] == {"blue": 11, "green": 1, "red": 13}
    assert check_file["classes"]["valid"] == {"blue": 4, "green": 1, "red": 4}


def test_warnings_are_quiet_on_clean_data(colour_data, tmp_path):
    found = check(config(colour_data, tmp_path), tmp_path, log=lambda line: None)
    assert found.problems == {} and found.warnings == []
    assert found.summary() == "24 images checked: all readable"


def kinds(data: Path, tmp_path: Path, **kw) -> dict[str, list[str]]:
    found = check(config(data, tmp_path, **kw), tmp_path, log=lambda line: None)
    return {f.kind: f.files for f in found.warnings}


def test_each_class_warning_fires_on_data_made_for_it(tmp_path):
    data = write_colour_dataset(tmp_path / "few", {"train": 10, "valid": 2})
    for f in sorted((data / "train" / "red").iterdir())[2:]:
        f.unlink()  # red: 2 training images, blue 10: too few, and 5x imbalanced
    for f in (data / "valid" / "blue").iterdir():
        f.unlink()
    found = kinds(data, tmp_path)
    assert set(found) == {"few_train", "few_valid", "imbalance"}
    messages = [f.message for f in check(config(data, tmp_path), tmp_path, log=lambda line: None).warnings]
    assert "red (2)" in messages[0] and "blue" in messages[1] and "5x" in messages[2]


def test_small_images_are_named_against_the_training_size(colour_data, tmp_path):
    assert "small_images" not in kinds(colour_data, tmp_path)  # 40 x 30 images at 32 px
    assert len(kinds(colour_data, tmp_path, sizes=[32, 64])["small_images"]) == 24  # 30 < 64 / 2


def test_leakage_is_caught_when_a_photo_is_resized_and_re_encoded_into_validation(tmp_path):
    data = write_colour_dataset(tmp_path / "leak", {"train": 8, "valid": 4})
    original = photo(11, (400, 300))
    (data / "train" / "red" / "holiday.png").write_bytes(png(original))
    (data / "valid" / "red" / "holiday_small.jpg").write_bytes(jpeg(original.resize((200, 150)), quality=75))
    (data / "train" / "blue" / "same_bytes.jpg").write_bytes(jpeg(photo(12)))
    (data / "train" / "red" / "same_bytes.jpg").write_bytes(jpeg(photo(12)))
    (data / "train" / "blue" / "twice_a.png").write_bytes(png(photo(13)))
    (data / "train" / "blue" / "twice_b.jpg").write_bytes(jpeg(photo(13), quality=90))
    found = kinds(data, tmp_path)
    assert found["leakage"] == ["train/red/holiday.png", "valid/red/holiday_small.jpg"]
    assert sorted(found["conflicting_labels"]) == ["train/blue/same_bytes.jpg", "train/red/same_bytes.jpg"]
    assert found["duplicates"] == ["train/blue/twice_a.png", "train/blue/twice_b.jpg"]


def test_unused_files_are_named_and_system_files_are_not(tmp_path):
    data = write_colour_dataset(tmp_path / "stray", {"train": 8, "valid": 4})
    (data / "train" / "red" / "IMG_0001.heic").write_bytes(b"\x00")
    (data / "train" / "red" / "Thumbs.db").write_bytes(b"\x00")
    (data / "train" / "red" / ".DS_Store").write_bytes(b"\x00")
    assert kinds(data, tmp_path) == {"not_read": ["train/red/IMG_0001.heic"]}


def test_exclude_leaves_files_out_of_training_only(colour_data, tmp_path):
    train = sorted((colour_data / "train" / "red").iterdir())[:2]
    valid = sorted((colour_data / "valid" / "red").iterdir())[0]
    listed = tmp_path / "label_errors.csv"
    rows = [f"{i},{p.relative_to(colour_data).as_posix()},x" for i, p in enumerate([*train, valid])]
    listed.write_text("rank,file,split\n" + "\n".join(rows) + "\n")
    cfg = config(colour_data, tmp_path, exclude=listed)
    data = make_data(cfg, 32, tmp_path)
    assert len(data.trn_files) == 14 and not set(train) & set(data.trn_files)
    assert len(data.val_files) == 8 and valid in data.val_files
    assert kinds(colour_data, tmp_path, exclude=listed) == {"exclude": [valid.relative_to(colour_data).as_posix()]}
    plain = tmp_path / "exclude.txt"
    plain.write_text(f"{train[0].relative_to(colour_data)}\n{train[1].resolve()}\n")
    expected = {p.relative_to(colour_data).as_posix() for p in train}
    assert read_exclude(plain, colour_data) == expected
    # An absolute path matches a --data given relative to the working directory, too.
    assert read_exclude(plain, Path(os.path.relpath(colour_data))) == expected


def test_skip_bad_records_what_it_leaves_out(dirty, tmp_path):
    with pytest.raises(DataError, match=r"5 of \d+ images cannot be read"):
        checked_config(config(dirty, tmp_path, max_pixels=int(MAX_PIXELS)), tmp_path, log=lambda line: None)
    cfg = checked_config(config(dirty, tmp_path, max_pixels=int(MAX_PIXELS), skip_bad=True), tmp_path, log=print)
    assert set(cfg.skipped) == set(BAD)
    data = make_data(cfg, 32, tmp_path)
    assert not {p.relative_to(dirty).as_posix() for p in [*data.trn_files, *data.val_files]} & set(BAD)


def test_a_file_over_the_servers_limit_trains_and_the_hint_names_the_flag(tmp_path):
    big = tmp_path / "scan.png"
    big.write_bytes(png(Image.new("L", (10000, 9000), 90)))  # 90 MP: over the server's 50 MP and Pillow's 89 MP warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning is noise once our own limit has passed the image
        assert scan_image(big, RunConfig().max_pixels).problem is None
    refused = scan_image(big, 1_000_000).problem
    assert refused is not None and "--max-pixels 90000000 reads it" in refused


def test_near_and_exact_duplicates_group_transitively():
    digests = ["a", "b", "a", "c", "d"]
    ones = 2**32 - 1  # 32 bits apart from 0, as different pictures are
    hashes = [0, ones, 1, ones ^ 0b11, ones << 32]
    assert duplicate_groups(digests, hashes) == [[0, 2], [1, 3]]
    assert duplicate_groups(digests, hashes, near_bits=0) == [[0, 2]]


def test_a_file_gone_bad_after_the_check_still_reads_as_one_line(tmp_path):
    from torch.utils.data import DataLoader

    from serving.bundle.preprocess import ImageError
    from trainer.cli import _message
    from trainer.data.loaders import ImageDataset

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageError) as raised:
        next(iter(DataLoader(ImageDataset([bad], [0], np.asarray), num_workers=1)))
    assert "Original Traceback" in str(raised.value)  # torch's worker traceback, in the message
    assert _message(raised.value) == f"{bad}: empty image: no bytes"


def test_max_pixels_stops_where_pillow_does(tmp_path, capsys):
    from PIL import Image as PILImage

    from trainer.cli import main
    from trainer.config import PILLOW_MAX_PIXELS

    assert PILLOW_MAX_PIXELS == 2 * PILImage.MAX_IMAGE_PIXELS  # the limit Pillow enforces before ours
    assert main(["verify", "--data", str(tmp_path), "--max-pixels", str(PILLOW_MAX_PIXELS + 1)]) == 2
    assert "--max-pixels: Input should be less than or equal to 178956970" in capsys.readouterr().err
