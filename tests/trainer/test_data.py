"""trainer.data.loaders: ImageClassifierData.from_csv on real files (a labels CSV and one folder of images), and dataset items."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import RunConfig
from trainer.data.augment import tfms_from_model
from trainer.data.loaders import DataError, ImageClassifierData, ImageDataset, get_cv_idxs

TFMS = tfms_from_model("efficientnet_lite0", 16)
LABELS = ["husky", "beagle", "pug"]


def write_dataset(root, n=20, *, suffix=".png", header="id,breed", skip_images=(), extra_rows=()):
    """root/train/<id><suffix> for n rows labelled in turn by LABELS, and root/labels.csv."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i in range(n):
        image_id = f"img{i:03d}"
        lines.append(f"{image_id},{LABELS[i % len(LABELS)]}")
        if i not in skip_images:
            Image.new("RGB", (8, 6), (i * 10, 0, 0)).save(root / "train" / f"{image_id}{suffix}")
    lines += extra_rows
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def from_csv(root, **kw):
    kw.setdefault("suffix", ".png")
    return ImageClassifierData.from_csv(root, "train", "labels.csv", TFMS, num_workers=0, **kw)


def val_ids(data):
    return [f.stem for f in data.val_files]


class TestFromCsv:
    def test_files_labels_and_classes(self, tmp_path):
        data = from_csv(write_dataset(tmp_path))
        assert isinstance(data, ImageClassifierData)
        assert data.classes == sorted(LABELS) and data.c == 3
        assert len(data.trn_files) + len(data.val_files) == 20
        for f, y in zip(data.trn_files + data.val_files, data.trn_y + data.val_y, strict=True):
            assert f.parent == tmp_path / "train" and f.suffix == ".png"
            assert data.classes[y] == LABELS[int(f.stem[3:]) % 3]
        assert data.test_files is None

    def test_default_split_is_get_cv_idxs_of_the_rows(self, tmp_path):
        data = from_csv(write_dataset(tmp_path))
        assert sorted(val_ids(data)) == sorted(f"img{i:03d}" for i in get_cv_idxs(20))

    def test_lesson_style_full_csv_path_and_test_folder(self, tmp_path):
        root = write_dataset(tmp_path)
        (root / "test").mkdir()
        Image.new("RGB", (8, 8)).save(root / "test" / "unlabelled.jpg")
        data = ImageClassifierData.from_csv(root, "train", root / "labels.csv", TFMS, suffix=".png", test_name="test")
        assert [f.name for f in data.test_files] == ["unlabelled.jpg"]

    def test_batches_are_readable(self, tmp_path):
        data = from_csv(write_dataset(tmp_path))
        x, y = data.dataset("train")[0]
        assert tuple(x.shape) == (3, 16, 16) and 0 <= y < 3


class TestSplit:
    def test_same_rows_same_split(self, tmp_path):
        root = write_dataset(tmp_path, n=50)
        assert val_ids(from_csv(root)) == val_ids(from_csv(root))

    @pytest.mark.parametrize("seed", [0, 7])
    def test_same_seed_same_split(self, tmp_path, seed):
        root = write_dataset(tmp_path, n=50)
        a = from_csv(root, val_idxs=get_cv_idxs(50, seed=seed))
        b = from_csv(root, val_idxs=get_cv_idxs(50, seed=seed))
        assert val_ids(a) == val_ids(b) and len(val_ids(a)) == 10

    def test_different_seed_different_split(self, tmp_path):
        root = write_dataset(tmp_path, n=50)
        a = from_csv(root, val_idxs=get_cv_idxs(50, seed=1))
        b = from_csv(root, val_idxs=get_cv_idxs(50, seed=2))
        assert set(val_ids(a)) != set(val_ids(b))

    def test_split_does_not_move_when_rows_are_skipped(self, tmp_path):
        val = set(get_cv_idxs(30).tolist())
        gone = {min(val), min(set(range(30)) - val)}  # one validation row and one training row
        with pytest.warns(UserWarning, match="skipped 2 of 30 rows"):
            data = from_csv(write_dataset(tmp_path, n=30, skip_images=gone), skip_missing=True)
        assert sorted(val_ids(data)) == sorted(f"img{i:03d}" for i in val - gone)
        assert len(data.trn_files) == 30 - len(val) - 1

    @pytest.mark.parametrize("val_idxs, message", [([0, 99], r"\[0, 20\)"), ([], "validation set is empty")])
    def test_bad_val_idxs(self, tmp_path, val_idxs, message):
        with pytest.raises(DataError, match=message):
            from_csv(write_dataset(tmp_path), val_idxs=val_idxs)


class TestMissingImages:
    def test_error_counts_and_names_the_first_five(self, tmp_path):
        root = write_dataset(tmp_path, skip_images=range(7))
        with pytest.raises(DataError) as e:
            from_csv(root)
        message = str(e.value)
        assert "labels.csv" in message and "7 of 20 rows" in message and "--skip-missing" in message
        for i in range(5):
            assert str(root / "train" / f"img{i:03d}.png") in message
        assert "img005" not in message and "img006" not in message

    def test_wrong_suffix_is_reported_as_missing(self, tmp_path):
        with pytest.raises(DataError, match=r"20 of 20 rows.*suffix='\.jpg'"):
            from_csv(write_dataset(tmp_path), suffix=".jpg")

    def test_skip_missing_warns_and_drops_the_rows(self, tmp_path):
        root = write_dataset(tmp_path, skip_images={3, 11})
        with pytest.warns(UserWarning, match=r"skipped 2 of 20 rows") as record:
            data = from_csv(root, skip_missing=True)
        assert "img003.png" in str(record[0].message)
        kept = {f.stem for f in data.trn_files + data.val_files}
        assert len(kept) == 18 and not kept & {"img003", "img011"}

    def test_run_config_has_the_flag_off_by_default(self):
        assert RunConfig().skip_missing is False and RunConfig(skip_missing=True).skip_missing is True

    def test_no_warning_when_nothing_is_missing(self, tmp_path):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            from_csv(write_dataset(tmp_path), skip_missing=True)


class TestColumns:
    def test_named_columns_in_any_order(self, tmp_path):
        root = tmp_path
        (root / "train").mkdir()
        rows = ["breed,score,file"]
        for i in range(10):
            Image.new("RGB", (4, 4)).save(root / "train" / f"f{i}.png")
            rows.append(f"{LABELS[i % 2]},0.5,f{i}")
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
        data = from_csv(root, id_col="file", label_col="breed")
        assert data.classes == ["beagle", "husky"]
        assert {f.name for f in data.trn_files + data.val_files} == {f"f{i}.png" for i in range(10)}

    @pytest.mark.parametrize("kw, name", [({"id_col": "image"}, "'image'"), ({"label_col": "label"}, "'label'")])
    def test_missing_named_column_lists_the_columns(self, tmp_path, kw, name):
        with pytest.raises(DataError) as e:
            from_csv(write_dataset(tmp_path), **kw)
        message = str(e.value)
        assert "labels.csv" in message and name in message and "'id', 'breed'" in message

    def test_header_bom_is_not_part_of_the_first_name(self, tmp_path):
        root = write_dataset(tmp_path)
        path = root / "labels.csv"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert from_csv(root, id_col="id", label_col="breed").c == 3


class TestBadCsv:
    @pytest.mark.parametrize(
        "text, message",
        [
            ("", "empty"),
            ("\n\n", "empty"),
            ("id\nimg000\n", "1 column"),
            ("id,breed\n", "no rows"),
            ("id,breed\nimg000,\n", "row 2 has no"),
            ("id,breed\nimg000,pug\nimg000,husky\n", "rows 2 and 3"),
            ("id,breed\nimg000,pug\nimg001,pug\n", "only 1 class"),
        ],
    )
    def test_message_names_the_file(self, tmp_path, text, message):
        root = write_dataset(tmp_path)
        (root / "labels.csv").write_text(text)
        with pytest.raises(DataError, match=message) as e:
            from_csv(root)
        assert "labels.csv" in str(e.value)

    def test_no_such_csv(self, tmp_path):
        with pytest.raises(DataError, match=r"nope.csv: no such CSV"):
            ImageClassifierData.from_csv(write_dataset(tmp_path), "train", "nope.csv", TFMS)

    @pytest.mark.parametrize(
        "kw, message", [({"folder": "pics"}, "pics: no such folder"), ({"test_name": "test"}, "no such test folder")]
    )
    def test_no_such_folder(self, tmp_path, kw, message):
        root = write_dataset(tmp_path)
        args = {"folder": "train", **kw}
        with pytest.raises(DataError, match=message):
            ImageClassifierData.from_csv(root, csv_fname="labels.csv", tfms=TFMS, suffix=".png", **args)


def test_a_missing_validation_folder_names_the_folders_there(tmp_path):
    """hymenoptera has val/, the lesson's layout valid/: the message says which exist and the flag."""
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / label / "a.png")
    with pytest.raises(DataError) as e:
        ImageClassifierData.from_paths(tmp_path, TFMS)
    assert f"{tmp_path}/valid: no such folder" in str(e.value)
    assert f"{tmp_path} holds train, val" in str(e.value) and "--val-name" in str(e.value)


def test_get_cv_idxs_is_a_fixed_fifth():
    a = get_cv_idxs(100)
    assert len(a) == 20 and len(set(a.tolist())) == 20 and np.array_equal(a, get_cv_idxs(100))


class TestItems:
    """ImageDataset hands torch.from_numpy writable arrays: torch warns (once per process) about a
    read-only one, whose memory the tensor would share."""

    @pytest.fixture
    def writable_flags(self, monkeypatch):
        seen, real = [], torch.from_numpy
        monkeypatch.setattr(torch, "from_numpy", lambda a: seen.append(a.flags.writeable) or real(a))
        return seen

    def test_read_only_transform_output_is_copied(self, tmp_path, writable_flags):
        Image.new("RGB", (8, 8), (9, 8, 7)).save(tmp_path / "a.png")

        def read_only(im):
            a = np.asarray(im)
            assert not a.flags.writeable  # numpy's view of a PIL image
            return a

        x, y = ImageDataset([tmp_path / "a.png"], [0], read_only)[0]
        assert writable_flags == [True] and x.shape == (3, 8, 8) and int(x[0, 0, 0]) == 9 and y == 0

    @pytest.mark.parametrize("augment", [False, True])
    def test_items_without_augmentation_families_are_writable(self, tmp_path, writable_flags, augment):
        # aug="none": a training view is a bare random crop.
        data = from_csv(write_dataset(tmp_path))
        item = (0, 123) if augment else 0
        x, _ = data.dataset("train", augment=augment)[item]
        assert writable_flags == [True] and tuple(x.shape) == (3, 16, 16)
