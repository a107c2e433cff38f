"""trainer.outputs.plots: each figure draws exactly its data (read back from the matplotlib Figure), every plot
writes a non-blank PNG of that figure, edge cases included; the lesson's selections pick exact rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from trainer.learn.schedule import sgdr_lrs
from trainer.outputs.plots import (
    DPI,
    MAX_ANNOTATED_CLASSES,
    RESTART_GID,
    confusion_matrix_figure,
    image_grid_figure,
    image_grid_titles,
    losses_figure,
    most_correct,
    most_incorrect,
    most_uncertain,
    plot_confusion_matrix,
    plot_image_grid,
    plot_losses,
    plot_schedule,
    restart_steps,
    schedule_figure,
)


def assert_png(path, min_side: int = 100) -> tuple[int, int]:
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > min_side and im.height > min_side, im.size
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 50, f"{path.name} looks blank: grey levels {lo}..{hi}"
        return im.size


def curves(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (x, y) of every line on `ax` but the restart markers."""
    return {
        line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
        for line in ax.get_lines()
        if line.get_gid() != RESTART_GID
    }


def sgdr_history(n_cycle=3, cycle_len=1, cycle_mult=2, spe=4, lrs=(1e-4, 1e-3, 1e-2)) -> list[list[float]]:
    kw = dict(n_cycle=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult, steps_per_epoch=spe)
    n_steps = spe * sum(cycle_len * cycle_mult**i for i in range(n_cycle))
    return [sgdr_lrs(s, lrs, **kw) for s in range(n_steps)]


class TestSchedule:
    def test_lines_are_the_lrs_and_restarts_are_marked(self):
        history = sgdr_history()
        ax = schedule_figure(history).axes[0]
        lines = curves(ax)
        assert list(lines) == ["early", "late", "head"]
        for g, (x, y) in enumerate(lines.values()):
            np.testing.assert_array_equal(x, np.arange(len(history)))
            np.testing.assert_array_equal(y, [row[g] for row in history])
        restarts = [line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == RESTART_GID]
        assert restarts == [4, 12]
        assert ax.get_yscale() == "log"

    def test_png_is_the_figure(self, tmp_path):
        w, h = schedule_figure(sgdr_history()).get_size_inches() * DPI
        assert assert_png(plot_schedule(sgdr_history(), tmp_path / "lr.png")) == (round(w), round(h))

    def test_non_positive_lrs_are_gaps_and_other_group_counts_are_numbered(self):
        lines = curves(schedule_figure([[0.1, 0.2], [0.0, -1.0], [0.05, 0.1]]).axes[0])
        assert list(lines) == ["group 0", "group 1"]
        np.testing.assert_array_equal(lines["group 0"][1], [0.1, np.nan, 0.05])
        np.testing.assert_array_equal(lines["group 1"][1], [0.2, np.nan, 0.1])

    def test_sgdr_history(self, tmp_path):
        assert_png(plot_schedule(sgdr_history(), tmp_path / "lr.png"))

    def test_restarts_are_the_cycle_starts(self):
        # cycles of 1, 2 and 4 epochs of 4 batches start at batches 0, 4 and 12
        assert restart_steps(sgdr_history()) == [4, 12]

    def test_one_batch_and_one_group(self, tmp_path):
        assert_png(plot_schedule([[0.01]], tmp_path / "lr.png"))

    def test_zero_lr_is_left_out(self, tmp_path):
        assert_png(plot_schedule([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], tmp_path / "lr.png"))

    def test_group_names_used_when_they_fit(self, tmp_path):
        assert_png(plot_schedule(sgdr_history(lrs=(1e-3, 1e-2)), tmp_path / "lr.png", group_names=("body", "head")))

    def test_empty_history(self, tmp_path):
        with pytest.raises(ValueError, match="empty"):
            plot_schedule([], tmp_path / "lr.png")
        assert not (tmp_path / "lr.png").exists()

    def test_ragged_rows(self, tmp_path):
        with pytest.raises(ValueError, match="one lr per layer group"):
            plot_schedule([[0.1, 0.2], [0.1]], tmp_path / "lr.png")


def epochs(n: int) -> list[dict]:
    return [dict(epoch=i, trn_loss=1 / (i + 1), val_loss=1.2 / (i + 1), accuracy=0.5 + 0.04 * i) for i in range(n)]


class TestLosses:
    def test_lines_are_the_history(self):
        history = epochs(5)
        history[0]["trn_loss"] = math.nan
        loss_ax, acc_ax = losses_figure(history).axes
        lines = curves(loss_ax)
        assert list(lines) == ["training loss", "validation loss"]
        for label, key in [("training loss", "trn_loss"), ("validation loss", "val_loss")]:
            np.testing.assert_array_equal(lines[label][0], [row["epoch"] for row in history])
            np.testing.assert_array_equal(lines[label][1], [row[key] for row in history])
        ((_, acc_y),) = curves(acc_ax).values()
        np.testing.assert_array_equal(acc_y, [row["accuracy"] for row in history])
        assert (loss_ax.get_ylabel(), acc_ax.get_ylabel()) == ("loss", "accuracy")

    def test_extra_keys_are_ignored(self):
        history = [dict(row, stage="head", seconds=1.5) for row in epochs(2)]
        assert len(curves(losses_figure(history).axes[0])) == 2

    @pytest.mark.parametrize("n", [1, 7])
    def test_epochs(self, tmp_path, n):
        assert_png(plot_losses(epochs(n), tmp_path / "sub" / "losses.png"))

    def test_nan_losses(self, tmp_path):
        history = epochs(4)
        history[0]["trn_loss"] = math.nan  # precompute epochs may have no training loss
        history[2]["val_loss"] = float("nan")
        assert_png(plot_losses(history, tmp_path / "losses.png"))

    def test_all_nan(self, tmp_path):
        assert_png(
            plot_losses(
                [dict(epoch=0, trn_loss=math.nan, val_loss=math.nan, accuracy=math.nan)], tmp_path / "losses.png"
            )
        )

    def test_empty_and_missing_key(self, tmp_path):
        with pytest.raises(ValueError, match="empty"):
            plot_losses([], tmp_path / "losses.png")
        with pytest.raises(ValueError, match="val_loss"):
            plot_losses([dict(epoch=0, trn_loss=1.0, accuracy=0.5)], tmp_path / "losses.png")


class TestConfusionMatrix:
    CM = np.array([[50, 3, 0], [7, 40, 1], [0, 0, 0]])

    def test_image_is_the_matrix_labelled_with_the_classes(self):
        ax = confusion_matrix_figure(self.CM, ["ants", "bees", "wasps"]).axes[0]
        np.testing.assert_array_equal(ax.images[0].get_array(), self.CM)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["ants", "bees", "wasps"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["ants", "bees", "wasps"]
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
        # One number per cell, row by row.
        assert [t.get_text() for t in ax.texts] == [str(v) for v in self.CM.ravel()]

    def test_normalized_rows(self):
        ax = confusion_matrix_figure(self.CM, ["ants", "bees", "wasps"], normalize=True).axes[0]
        np.testing.assert_allclose(
            ax.images[0].get_array(), [[50 / 53, 3 / 53, 0], [7 / 48, 40 / 48, 1 / 48], [0, 0, 0]]
        )
        assert ax.texts[0].get_text() == "0.94"

    @pytest.mark.parametrize("n", [MAX_ANNOTATED_CLASSES + 1, 50, 400])
    def test_many_classes_no_numbers_and_bounded_size(self, n):
        cm = np.arange(n * n).reshape(n, n)
        fig = confusion_matrix_figure(cm, [f"c{i}" for i in range(n)])
        ax = fig.axes[0]
        assert len(ax.texts) == 0
        np.testing.assert_array_equal(ax.images[0].get_array(), cm)
        w, h = fig.get_size_inches() * DPI
        assert w <= 1750 and h <= 1600

    @pytest.mark.parametrize("normalize", [False, True])
    def test_two_classes(self, tmp_path, normalize):
        cm = np.array([[50, 3], [7, 40]])
        assert_png(plot_confusion_matrix(cm, ["ants", "bees"], tmp_path / "cm.png", normalize=normalize))

    def test_one_class(self, tmp_path):
        assert_png(plot_confusion_matrix(np.array([[5]]), ["ants"], tmp_path / "cm.png"))

    def test_empty_row_normalized(self, tmp_path):
        cm = np.array([[0, 0], [0, 0]])
        assert_png(plot_confusion_matrix(cm, ["ants", "bees"], tmp_path / "cm.png", normalize=True))

    def test_fifty_classes(self, tmp_path):
        rng = np.random.default_rng(0)
        cm = rng.integers(0, 5, size=(50, 50)) + np.diag(rng.integers(20, 60, size=50))
        w, h = assert_png(plot_confusion_matrix(cm, [f"class_{i}" for i in range(50)], tmp_path / "cm.png"))
        assert w < 3000 and h < 3000

    def test_shape_errors(self, tmp_path):
        with pytest.raises(ValueError, match="square"):
            plot_confusion_matrix(np.zeros((2, 3)), ["a", "b"], tmp_path / "cm.png")
        with pytest.raises(ValueError, match="class names"):
            plot_confusion_matrix(np.zeros((2, 2)), ["a"], tmp_path / "cm.png")


# Rows: 0 right 0.9, 1 wrong (pred 0, 0.8), 2 right 0.6, 3 wrong (pred 1, 0.55), 4 right 0.9 (tie with 0),
# 5 wrong (pred 0, 0.8; tie with 1), 6 right 0.51.
PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.45, 0.55], [0.1, 0.9], [0.8, 0.2], [0.51, 0.49]])
Y = np.array([0, 1, 1, 0, 1, 1, 0])


class TestSelections:
    def test_most_correct(self):
        np.testing.assert_array_equal(most_correct(PROBS, Y, 3), [0, 4, 2])
        np.testing.assert_array_equal(most_correct(PROBS, Y, 10), [0, 4, 2, 6])

    def test_most_incorrect(self):
        np.testing.assert_array_equal(most_incorrect(PROBS, Y, 10), [1, 5, 3])
        np.testing.assert_array_equal(most_incorrect(PROBS, Y, 1), [1])

    def test_most_uncertain_binary(self):
        # margins: 0.8, 0.6, 0.2, 0.1, 0.8, 0.6, 0.02
        np.testing.assert_array_equal(most_uncertain(PROBS, 3), [6, 3, 2])

    def test_most_uncertain_uses_the_top_two(self):
        # Row 1's top two are far apart though its top is near 1/3; row 0's top two nearly tie.
        probs = np.array([[0.45, 0.44, 0.11], [0.34, 0.06, 0.60], [0.5, 0.3, 0.2]])
        np.testing.assert_array_equal(most_uncertain(probs, 3), [0, 2, 1])

    def test_empty_selection_and_k_zero(self):
        assert most_incorrect(PROBS[[0, 2]], Y[[0, 2]], 5).tolist() == []
        assert most_correct(PROBS, Y, 0).tolist() == []

    def test_bad_input(self):
        with pytest.raises(ValueError, match="one label per row"):
            most_correct(PROBS, Y[:3], 2)
        with pytest.raises(ValueError, match="k must be"):
            most_uncertain(PROBS, -1)
        with pytest.raises(ValueError, match="2\\+ classes"):
            most_uncertain(np.ones((3, 1)), 1)

    def test_titles(self):
        titles = image_grid_titles(PROBS, Y, ["ants", "bees"], [1, 4])
        assert titles == ["true bees\npred ants (p=0.80)", "true bees\npred bees (p=0.90)"]


@pytest.fixture
def photos(tmp_path):
    """A landscape JPEG, a portrait PNG, and a JPEG stored sideways with EXIF orientation 6."""
    a = tmp_path / "wide.jpg"
    Image.new("RGB", (300, 150), (200, 40, 40)).save(a)
    b = tmp_path / "tall.png"
    Image.new("RGBA", (80, 200), (40, 40, 200, 128)).save(b)
    c = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the decoded image is 100 wide, 240 tall
    Image.new("RGB", (240, 100), (40, 200, 40)).save(c, exif=exif)
    return [a, b, c]


class TestImageGrid:
    def test_titles_and_thumbnails_drawn(self, photos):
        titles = ["true ants\npred bees (p=0.93)", "tall", "rotated"]
        axes = image_grid_figure(photos, titles, cols=2, thumb=160).axes
        assert len(axes) == 4  # 2 x 2, the last cell empty
        assert [ax.get_title() for ax in axes] == [*titles, ""]
        # Longer side 160 px, aspect kept; the EXIF-rotated photo is drawn upright (tall).
        shapes = [ax.images[0].get_array().shape[:2] for ax in axes[:3]]
        assert shapes == [(80, 160), (160, 64), (160, 67)]
        assert len(axes[3].images) == 0

    def test_unreadable_file_drawn_as_a_message(self, tmp_path, photos):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        axes = image_grid_figure([photos[0], bad], ["a", "b"]).axes
        assert [ax.get_title() for ax in axes] == ["a", "b"]
        assert len(axes[1].images) == 0 and [t.get_text() for t in axes[1].texts] == ["cannot read\nbad.jpg"]

    def test_empty_says_so(self):
        assert [t.get_text() for t in image_grid_figure([], []).texts] == ["no images"]

    def test_grid(self, tmp_path, photos):
        titles = ["true ants\npred bees (p=0.93)", "tall", "rotated"]
        assert_png(plot_image_grid(photos, titles, tmp_path / "grid.png", cols=2))

    def test_many_columns_one_row(self, tmp_path, photos):
        assert_png(plot_image_grid(photos[:1], ["one"], tmp_path / "grid.png", cols=4))

    def test_exif_orientation_applied(self, photos):
        from serving.bundle.preprocess import decode_image

        assert decode_image(photos[2].read_bytes()).size == (100, 240)

    def test_unreadable_file_gets_a_cell(self, tmp_path, photos):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        assert_png(plot_image_grid([photos[0], bad, tmp_path / "gone.jpg"], ["a", "b", "c"], tmp_path / "grid.png"))

    def test_empty(self, tmp_path):
        assert_png(plot_image_grid([], [], tmp_path / "grid.png"))

    def test_titles_must_match(self, tmp_path, photos):
        with pytest.raises(ValueError, match="one title per file"):
            plot_image_grid(photos, ["a"], tmp_path / "grid.png")
