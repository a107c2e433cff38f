"""trainer.audit.label_errors: out-of-fold probabilities and confident learning on made-up features
with labels flipped on purpose, and `trainer clean` through the CLI on generated pictures."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from trainer.audit.label_errors import (
    CSV_COLUMNS,
    LabelledImages,
    Suspect,
    confident_labels,
    confident_thresholds,
    find_label_errors,
    fixed_labels,
    out_of_fold_probs,
    usable_folds,
)
from trainer.cli import main
from trainer.config import RunConfig
from trainer.outputs.run_folder import RunFolder


def clusters(per_class: int = 100, n_classes: int = 3, dim: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters that a linear model separates, in as many dimensions as a backbone's pooled
    activations have hundreds: features and true labels, classes in turn."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    return centres[y] + rng.normal(0, 1, (len(y), dim)), y


def flip(y: np.ndarray, fraction: float, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with `fraction` of them moved to another class at random, and the indices moved."""
    rng = np.random.default_rng(seed)
    moved = rng.choice(len(y), round(len(y) * fraction), replace=False)
    noisy = y.copy()
    noisy[moved] = (y[moved] + rng.integers(1, n_classes, len(moved))) % n_classes
    return noisy, moved


class TestUsableFolds:
    @pytest.mark.parametrize(
        ("counts", "folds", "expected"),
        [
            ((50, 50), 5, 5),
            ((50, 3), 5, 3),  # the smallest class allows three
            ((50, 2), 5, 2),
            ((50, 40, 1), 5, 5),  # a class of one image cannot be helped by any number of folds
            ((50, 50), 2, 2),
        ],
    )
    def test_the_smallest_class_of_two_or_more_images_decides(self, counts, folds, expected):
        y = np.repeat(np.arange(len(counts)), counts)
        assert usable_folds(y, folds) == expected

    def test_no_class_of_two_images_is_an_error(self):
        with pytest.raises(ValueError, match="at most one image"):
            usable_folds(np.array([0, 1, 2]), 5)


class TestOutOfFoldProbs:
    def test_one_row_per_image_over_every_class(self):
        x, y = clusters(per_class=20)
        probs = out_of_fold_probs(x, y, n_classes=4)  # a fourth class without images: a column of zeros
        assert probs.shape == (60, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)
        assert (probs[:, 3] == 0).all()
        assert (probs.argmax(axis=1) == y).mean() > 0.95

    def test_the_same_seed_gives_the_same_probabilities(self):
        x, y = clusters(per_class=20)
        np.testing.assert_array_equal(out_of_fold_probs(x, y, seed=3), out_of_fold_probs(x, y, seed=3))

    def test_an_image_is_predicted_by_a_model_that_never_saw_it(self):
        """A class of one image: whichever fold holds it out trained without its class, so its own
        column is 0 for it, and its row still lines up with all classes."""
        x, y = clusters(per_class=20)
        x, y = np.vstack([x, x[:1] + 0.01]), np.append(y, 3)  # a near-copy of image 0, labelled with a class of its own
        probs = out_of_fold_probs(x, y)
        assert probs.shape == (61, 4)
        assert probs[60, 3] == 0 and probs[60].argmax() == y[0]
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)

    def test_two_classes_one_of_them_a_single_image(self):
        x, y = clusters(per_class=10, n_classes=2)
        x, y = x[:11], y[:11]  # ten of class 0, one of class 1
        probs = out_of_fold_probs(x, y, folds=5)
        np.testing.assert_array_equal(probs[10], [1.0, 0.0])  # its fold's training part held class 0 only

    def test_fewer_folds_when_a_class_is_small_and_it_says_so(self):
        x, y = clusters(per_class=20)
        keep = np.r_[0:40, 40:43]  # the third class keeps three images
        said: list[str] = []
        probs = out_of_fold_probs(x[keep], y[keep], folds=5, log=said.append)
        assert probs.shape == (43, 3) and said == ["3 folds instead of 5: the smallest class of 2+ images has 3 images"]

    def test_mismatched_rows_are_refused(self):
        with pytest.raises(ValueError, match="one row of features per label"):
            out_of_fold_probs(np.zeros((4, 2)), np.array([0, 1, 0]))


class TestConfidentLearning:
    def test_thresholds_are_each_class_mean_self_confidence(self):
        probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
        np.testing.assert_allclose(confident_thresholds(probs, np.array([0, 0, 1, 1, 1])), [0.8, 0.5])

    def test_a_class_of_one_image_has_no_threshold(self):
        assert confident_thresholds(np.array([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]]), np.array([0, 0, 1]))[1] == np.inf

    def test_confident_label_is_the_most_probable_class_over_its_threshold(self):
        probs = np.array([[0.55, 0.25, 0.2], [0.3, 0.25, 0.45], [0.4, 0.1, 0.5], [0.05, 0.0, 0.95]])
        # Row 0: classes 0 and 1 pass, 0 is likelier. Row 1: class 2 is the likeliest, but only class
        # 1 passes. Row 2: none passes (not counted in the confident joint).
        np.testing.assert_array_equal(confident_labels(probs, np.array([0.5, 0.2, 0.9])), [0, 1, -1, 2])

    def test_a_class_whose_images_are_equally_sure_reaches_its_own_threshold(self):
        # t_1 is the mean of 0.1, 0.1 and 0.1, which float rounding puts a hair above 0.1.
        probs = np.array([[0.95, 0.05], [0.99, 0.01], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
        y = np.array([0, 0, 1, 1, 1])
        assert confident_thresholds(probs, y)[1] > 0.1
        np.testing.assert_array_equal(confident_labels(probs, confident_thresholds(probs, y)), [-1, 0, 1, 1, 1])

    def test_off_diagonal_images_ranked_by_self_confidence(self):
        probs = np.array([[0.9, 0.1], [0.95, 0.05], [0.1, 0.9], [0.05, 0.95], [0.8, 0.2], [0.97, 0.03], [0.2, 0.8]])
        y = np.array([0, 0, 1, 1, 1, 1, 0])
        assert find_label_errors(probs, y) == [
            Suspect(index=5, given=1, predicted=0, p_given=pytest.approx(0.03), p_predicted=0.97),
            Suspect(index=4, given=1, predicted=0, p_given=pytest.approx(0.2), p_predicted=0.8),
            Suspect(index=6, given=0, predicted=1, p_given=pytest.approx(0.2), p_predicted=0.8),
        ]

    def test_an_image_whose_given_label_is_still_the_most_probable_is_not_flagged(self):
        # Image 2 (labelled 0): p_0 = 0.6 is below t_0 = 0.83 and p_1 = 0.4 passes t_1 = 0.3, so the
        # confident joint counts it at (0, 1); but 0 is still its likeliest class.
        probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.6, 0.4], [0.8, 0.2]])
        y = np.array([0, 0, 0, 1, 1])
        assert confident_labels(probs, confident_thresholds(probs, y))[2] == 1
        assert find_label_errors(probs, y) == []

    def test_most_flipped_labels_are_flagged_first_and_few_clean_ones(self):
        x, y = clusters()
        noisy, moved = flip(y, 0.1, 3)
        suspects = find_label_errors(out_of_fold_probs(x, noisy), noisy)
        flagged = {s.index for s in suspects}
        assert len(flagged & set(moved)) >= 0.8 * len(moved)
        assert len(flagged - set(moved)) <= 0.03 * (len(y) - len(moved))
        top = {s.index for s in suspects[: len(moved)]}
        assert len(top & set(moved)) >= 0.8 * len(moved)
        assert all(s.predicted == y[s.index] for s in suspects if s.index in set(moved))

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_quiet_on_clean_labels(self, seed):
        x, y = clusters(seed=seed)
        assert len(find_label_errors(out_of_fold_probs(x, y, seed=seed), y)) <= 1

    def test_classes_with_few_images(self):
        """A class of three images and one of a single image: the flipped image of the large classes
        is still found, and the single image (no model saw its class) ranks first."""
        x, y = clusters(per_class=30)
        x, y = np.vstack([x[:60], x[60:63], x[:1] + 0.01]), np.r_[y[:60], y[60:63], 3]
        noisy = y.copy()
        noisy[5] = 1  # a 0 labelled 1
        suspects = find_label_errors(out_of_fold_probs(x, noisy, n_classes=4), noisy)
        assert suspects[0] == Suspect(63, 3, 0, 0.0, pytest.approx(suspects[0].p_predicted))
        assert 5 in [s.index for s in suspects[:3]]


# --- `trainer clean` end to end --------------------------------------------------------------------

SHAPES = ("circle", "stripes", "checks")  # sorted, the classes are checks, circle, stripes
PER_CLASS = 30
FLIPPED_PER_CLASS = 2


def picture(shape: str, rng: np.random.Generator, side: int = 64) -> Image.Image:
    """A red disc, green vertical stripes or blue checks on a light background, with noise: three
    classes a pretrained backbone tells apart at once."""
    im = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        r = int(rng.integers(side // 4, side // 2 - 2))
        cx, cy = (int(v) for v in rng.integers(r, side - r, 2))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(int(rng.integers(170, 240)), 30, 30))
    elif shape == "stripes":
        w = int(rng.integers(3, 7))
        for left in range(int(rng.integers(0, w)), side, 2 * w):
            draw.rectangle([left, 0, left + w - 1, side], fill=(20, int(rng.integers(120, 200)), 40))
    else:
        w = int(rng.integers(4, 9))
        for i in range(0, side, w):
            for j in range(0, side, w):
                if (i // w + j // w) % 2:
                    draw.rectangle([i, j, i + w - 1, j + w - 1], fill=(30, 40, int(rng.integers(150, 230))))
    noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 12, (side, side, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_shapes(root: Path, seed: int = 0) -> dict[str, str]:
    """root/images/<id>.jpg and root/labels.csv (columns name, note, kind, in that order) with
    FLIPPED_PER_CLASS labels of each class moved to another class; returns the moved ids and their
    true class."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows, moved = [], {}
    for c, shape in enumerate(SHAPES):
        wrong = set(rng.choice(PER_CLASS, FLIPPED_PER_CLASS, replace=False).tolist())
        for i in range(PER_CLASS):
            image_id = f"{shape}{i:02d}"
            picture(shape, rng).save(root / "images" / f"{image_id}.jpg", quality=90)
            label = SHAPES[(c + int(rng.integers(1, 3))) % 3] if i in wrong else shape
            if i in wrong:
                moved[image_id] = shape
            rows.append(f'{image_id},"note, {i}",{label}')
    (root / "labels.csv").write_text("name,note,kind\n" + "\n".join(rows) + "\n")
    return moved


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """The shapes dataset and a run folder with only config.json: (data, run, moved ids)."""
    root = tmp_path_factory.mktemp("shapes")
    moved = write_shapes(root / "data")
    cfg = RunConfig(
        data=root / "data",
        csv="labels.csv",
        folder="images",
        suffix=".jpg",
        id_col="name",
        label_col="kind",
        size=64,
        out=root / "run",
        num_workers=0,
    )
    RunFolder(cfg.out).write_config(cfg)
    return root / "data", cfg.out, moved


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cleaned(shapes, tmp_path_factory) -> tuple[list[dict[str, str]], Path, str]:
    """`trainer clean` on the shapes run with --write-labels: (label_errors.csv's rows, the relabelled
    copy, what it printed)."""
    _, run, _ = shapes
    relabelled = tmp_path_factory.mktemp("fixed") / "labels.csv"
    said = io.StringIO()  # module scope: capsys is per test
    with contextlib.redirect_stdout(said):
        assert main(["clean", "--run", str(run), "--write-labels", str(relabelled), "--top", "6"]) == 0
    return read_csv(run / "label_errors.csv"), relabelled, said.getvalue()


class TestClean:
    def test_most_flipped_images_are_the_top_suspects(self, shapes, cleaned):
        _, _, moved = shapes
        rows, _, _ = cleaned
        top = [Path(r["file"]).stem for r in rows[: len(moved) + 2]]
        assert len(set(top) & set(moved)) >= len(moved) - 1, rows
        assert len(rows) <= len(moved) + 3, rows  # few clean images flagged
        for r in rows:
            if Path(r["file"]).stem in moved:
                assert r["predicted"] == moved[Path(r["file"]).stem]

    def test_csv_rows_are_ranked_and_name_files_under_the_data_folder(self, shapes, cleaned):
        data, run, _ = shapes
        rows, _, _ = cleaned
        assert list(rows[0]) == list(CSV_COLUMNS)
        assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
        assert [float(r["p_given"]) for r in rows] == sorted(float(r["p_given"]) for r in rows)
        for r in rows:
            assert r["file"].startswith("images/") and (data / r["file"]).is_file()
            assert r["split"] in ("train", "valid") and r["given"] != r["predicted"]
            assert float(r["p_predicted"]) > float(r["p_given"])
        with Image.open(run / "label_errors.png") as im:
            im.verify()

    def test_it_says_what_it_ranked_found_and_wrote(self, shapes, cleaned):
        _, run, _ = shapes
        rows, relabelled, said = cleaned
        n_train = sum(r["split"] == "train" for r in rows)
        assert f"ranked {3 * PER_CLASS} labelled images (72 train, 18 valid)" in said
        assert "out-of-fold accuracy of the head:" in said
        assert f"flagged {len(rows)} likely label errors ({n_train} train, {len(rows) - n_train} valid)" in said
        assert f"1. {rows[0]['file']} ({rows[0]['split']}): given {rows[0]['given']}" in said
        for path in (run / "label_errors.csv", run / "label_errors.png", relabelled):
            assert str(path) in said

    def test_relabelled_copy_changes_only_the_flagged_rows(self, shapes, cleaned):
        data, _, _ = shapes
        rows, relabelled, _ = cleaned
        fixes = {Path(r["file"]).stem: r["predicted"] for r in rows}
        original = (data / "labels.csv").read_text().splitlines()
        copy = relabelled.read_text().splitlines()
        assert copy[0] == original[0] == "name,note,kind" and len(copy) == len(original)
        for before, after in zip(read_csv(data / "labels.csv"), read_csv(relabelled), strict=True):
            assert after == {**before, "kind": fixes.get(before["name"], before["kind"])}

    def test_dropped_copy_leaves_out_the_flagged_rows(self, shapes, cleaned, tmp_path):
        data, shared_run, _ = shapes
        rows, _, _ = cleaned
        run = shutil.copytree(shared_run, tmp_path / "run")  # the other tests read the shared run's figure
        dropped = tmp_path / "dropped.csv"
        assert main(["clean", "--run", str(run), "--write-labels", str(dropped), "--fix", "drop", "--top", "0"]) == 0
        flagged = {Path(r["file"]).stem for r in rows}
        assert [r for r in read_csv(data / "labels.csv") if r["name"] not in flagged] == read_csv(dropped)
        assert not (run / "label_errors.png").exists()  # --top 0: no figure, and no stale one left

    def test_the_labels_csv_itself_is_never_replaced(self, shapes, capsys):
        data, run, _ = shapes
        assert main(["clean", "--run", str(run), "--write-labels", str(data / "labels.csv")]) == 2
        assert "that is the labels CSV itself" in capsys.readouterr().err

    @pytest.mark.parametrize("dataset", ["folder", "digits"])
    def test_a_dataset_without_a_labels_csv_has_none_to_write(self, dataset, colours, tmp_path, capsys):
        data, says = (
            (colours, "is a folder dataset (one folder per class), which")
            if dataset == "folder"
            else (None, "the embedded digits")
        )
        RunFolder(tmp_path / "run").write_config(RunConfig(data=data, size=32, out=tmp_path / "run", num_workers=0))
        code = main(["clean", "--run", str(tmp_path / "run"), "--write-labels", str(tmp_path / "labels.csv")])
        err = capsys.readouterr().err
        assert code == 2 and f"{says} has no labels CSV to copy" in err and "--exclude" in err, err
        assert not (tmp_path / "run" / "label_errors.csv").exists()  # refused before any work


class TestFixedLabels:
    """The --write-labels copy on a CSV's text: only the flagged rows change."""

    TEXT = '\r\nid,label,note,extra\r\na,cat," x, y ",1\r\n\r\nb,dog,,2\r\n c ,cat,z,3\r\n'

    @pytest.fixture
    def images(self, tmp_path) -> LabelledImages:
        root = tmp_path / "data"
        files = [root / "train" / f"{name}.jpg" for name in ("a", "b", "c")]
        return LabelledImages(
            root, files, ["train", "valid", "train"], np.array([0, 1, 0]), np.zeros((3, 1)), ["cat", "dog"]
        )

    def cfg(self, images: LabelledImages) -> RunConfig:
        return RunConfig(data=images.root, csv="labels.csv", suffix=".jpg")

    def test_relabel_changes_the_label_cell_of_the_flagged_rows_only(self, images):
        suspects = [Suspect(2, 0, 1, 0.1, 0.9)]  # image c, whose id is written with spaces around it
        fixed = fixed_labels(self.TEXT, self.cfg(images), images, suspects, "relabel")
        assert fixed == self.TEXT.replace(" c ,cat,z,3", " c ,dog,z,3")

    def test_drop_leaves_out_the_flagged_rows_only(self, images):
        suspects = [Suspect(0, 0, 1, 0.1, 0.9), Suspect(1, 1, 0, 0.2, 0.8)]
        fixed = fixed_labels(self.TEXT, self.cfg(images), images, suspects, "drop")
        assert fixed == "\r\nid,label,note,extra\r\n\r\n c ,cat,z,3\r\n"

    def test_named_columns(self, images):
        text = "label,id\ncat,a\ndog,b\n"
        cfg = self.cfg(images).model_copy(update={"id_col": "id", "label_col": "label"})
        assert fixed_labels(text, cfg, images, [Suspect(1, 1, 0, 0.1, 0.9)], "relabel") == "label,id\ncat,a\ncat,b\n"

    def test_an_unknown_fix_is_refused(self, images):
        with pytest.raises(ValueError, match="relabel, drop"):
            fixed_labels(self.TEXT, self.cfg(images), images, [], "delete")
