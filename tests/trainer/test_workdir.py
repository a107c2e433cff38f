"""trainer.data.workdir: derived files go beside the data, or to the user's cache when it is read-only."""

from __future__ import annotations

import pytest

from trainer.data.workdir import default_work_dir


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "lesson2-classifier"


class TestDefaultWorkDir:
    def test_writable_data_folder_is_its_own_work_dir(self, tmp_path, cache_home):
        (tmp_path / "data").mkdir()
        assert default_work_dir(tmp_path / "data") == (tmp_path / "data").resolve()

    @pytest.mark.parametrize("mode", [0o555, 0o500])
    def test_read_only_mode_sends_it_to_the_user_cache(self, tmp_path, cache_home, mode):
        # Root may write anywhere (os.access says yes); a mode that grants nobody write access must
        # still count as read-only.
        data = tmp_path / "data"
        data.mkdir(mode=mode)
        try:
            work = default_work_dir(data)
        finally:
            data.chmod(0o755)
        assert work.parent == cache_home and work.name.startswith("data-")

    def test_one_cache_folder_per_dataset(self, tmp_path, cache_home):
        a, b = tmp_path / "a" / "data", tmp_path / "b" / "data"
        for d in (a, b):
            d.mkdir(parents=True, mode=0o555)
        try:
            assert default_work_dir(a) != default_work_dir(b)
            assert default_work_dir(a) == default_work_dir(tmp_path / "a" / ".." / "a" / "data")
        finally:
            for d in (a, b):
                d.chmod(0o755)
