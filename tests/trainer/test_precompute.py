"""trainer.learn.precompute: the activation cache reuses what fits and says in one line why it recomputes."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import pytest
import torch

from serving.bundle.manifest import CENTER, Preprocessing, TTAView
from trainer.learn.precompute import cache_key, cached, files_fingerprint, load, save

PREP = Preprocessing(input_size=16, resize_size=18)
WEIGHTS = "a" * 64


@pytest.fixture
def files(tmp_path):
    out = []
    for i in range(3):
        f = tmp_path / "data" / f"img{i}.png"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(bytes([i]) * 10)
        out.append(f)
    return out


def key(files, *, weights=WEIGHTS, prep=PREP, view=CENTER, arch="tiny"):
    return cache_key(arch, weights, prep, view, files)


class Recorder:
    """compute() and log() of one cached() call: how often it computed and what it said."""

    def __init__(self, n: int):
        self.n, self.computed, self.lines = n, 0, []

    def compute(self) -> torch.Tensor:
        self.computed += 1
        return torch.arange(self.n * 2, dtype=torch.float32).reshape(self.n, 2)

    def log(self, line: str) -> None:
        self.lines.append(line)


def run(path, k, n):
    r = Recorder(n)
    features = cached(path, k, n, r.compute, log=r.log)
    return r, features


def touch(f, seconds=1):
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


class TestReuse:
    def test_computed_once_then_read_back_silently(self, tmp_path, files):
        path = tmp_path / "cache" / "tiny_16_train.pt"
        first, a = run(path, key(files), 3)
        second, b = run(path, key(files), 3)
        assert (first.computed, second.computed) == (1, 0)
        assert first.lines == second.lines == [] and torch.equal(a, b)

    def test_digest_is_unchanged_so_older_cache_files_stay_valid(self, files):
        # The key's digest is the sha256 of the sorted JSON of its parts, as before the parts were stored.
        spec = {
            "format": 1,
            "arch": "tiny",
            "weights": WEIGHTS,
            "prep": PREP.model_dump(mode="json"),
            "view": CENTER.model_dump(mode="json"),
            "files": files_fingerprint(files),
        }
        assert key(files).digest == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class TestWhyItRecomputes:
    """Each change is named in the one line that `log` hears, and the activations are recomputed."""

    def check(self, tmp_path, before, after, n_after, *expected):
        path = tmp_path / "cache" / "tiny_16_train.pt"
        run(path, before, len(json.loads(before.spec)["files"]))
        r, features = run(path, after, n_after)
        assert r.computed == 1 and features.shape[0] == n_after
        assert len(r.lines) == 1 and "out of date" in r.lines[0] and "recomputing" in r.lines[0]
        for phrase in expected:
            assert phrase in r.lines[0]
        return r.lines[0]

    def test_file_added(self, tmp_path, files):
        extra = files[0].with_name("new.png")
        extra.write_bytes(b"x")
        line = self.check(tmp_path, key(files), key([*files, extra]), 4, "data changed", "1 added", "new.png")
        assert "removed" not in line and "weights" not in line

    def test_file_removed(self, tmp_path, files):
        self.check(tmp_path, key(files), key(files[:2]), 2, "data changed", "1 removed", "img2.png")

    def test_file_modified(self, tmp_path, files):
        before = key(files)
        touch(files[1])
        line = self.check(tmp_path, before, key(files), 3, "data changed", "1 modified", "img1.png")
        assert "added" not in line

    def test_same_files_in_another_order(self, tmp_path, files):
        self.check(tmp_path, key(files), key(files[::-1]), 3, "data changed", "another order")

    def test_backbone_weights_changed(self, tmp_path, files):
        line = self.check(tmp_path, key(files), key(files, weights="b" * 64), 3, "backbone weights changed")
        assert "data changed" not in line

    @pytest.mark.parametrize(
        "prep, phrase",
        [
            (Preprocessing(input_size=12, resize_size=18), "input_size 16 -> 12"),
            (
                Preprocessing(input_size=16, resize_size=18, interpolation="bicubic"),
                "interpolation bilinear -> bicubic",
            ),
        ],
    )
    def test_size_or_preprocessing_changed(self, tmp_path, files, prep, phrase):
        self.check(tmp_path, key(files), key(files, prep=prep), 3, "size/preprocessing changed", phrase)

    def test_view_changed(self, tmp_path, files):
        view = TTAView(name="center", zoom=1.1)
        self.check(tmp_path, key(files), key(files, view=view), 3, "view changed", "zoom 1.0 -> 1.1")

    def test_several_changes_in_one_line(self, tmp_path, files):
        after = key(files[:2], weights="b" * 64)
        self.check(tmp_path, key(files), after, 2, "backbone weights changed", "data changed (1 removed")

    def test_file_from_before_the_parts_were_stored(self, tmp_path, files):
        path = tmp_path / "old.pt"
        features = torch.zeros(3, 2)
        save(path, key(files), features)
        blob = torch.load(path, weights_only=True)
        del blob["spec"]
        buf = io.BytesIO()
        torch.save(blob, buf)
        path.write_bytes(buf.getvalue())
        assert load(path, key(files), 3) is not None  # same key: still used
        lines = []
        assert load(path, key(files, weights="b" * 64), 3, log=lines.append) is None
        assert len(lines) == 1 and "does not record what it was made from" in lines[0]


class TestDamaged:
    def test_truncated_file_is_named_damaged(self, tmp_path, files):
        path = tmp_path / "cache.pt"
        run(path, key(files), 3)
        path.write_bytes(path.read_bytes()[:100])
        r, _ = run(path, key(files), 3)
        assert r.computed == 1 and len(r.lines) == 1 and "damaged" in r.lines[0]

    def test_absent_file_is_computed_without_a_line(self, tmp_path, files):
        r, _ = run(tmp_path / "none.pt", key(files), 3)
        assert r.computed == 1 and r.lines == []

    def test_without_log_the_line_is_a_logged_warning(self, tmp_path, files, caplog):
        path = tmp_path / "cache.pt"
        cached(path, key(files), 3, Recorder(3).compute)
        with caplog.at_level(logging.WARNING, logger="trainer.learn.precompute"):
            cached(path, key(files, weights="b" * 64), 3, Recorder(3).compute)
        assert "backbone weights changed" in caplog.text
