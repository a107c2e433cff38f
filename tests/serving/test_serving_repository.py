"""The model repository without a network: scanning, version policies, publishing a version, the
registry's choice of model per call, and the memory budget."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from conftest import server_config

from serving.bundle.manifest import MANIFEST_NAME, read_manifest
from serving.config import ConfigError, ServerConfig, load_config
from serving.engine.batcher import Batcher
from serving.engine.errors import CallFailed
from serving.monitoring import Metrics
from serving.repository.layout import RepositoryError, Scanner, VersionDir, parse_policies, publish, staging_dir, wanted
from serving.repository.registry import Registry, ServedModel, memory_estimate, open_model
from serving.repository.watcher import Watcher


def version(root: Path, model: str, number: int | str, files: dict[str, bytes] | None = None) -> Path:
    folder = root / model / str(number)
    folder.mkdir(parents=True)
    for name, data in (files or {"manifest.json": b"{}"}).items():
        (folder / name).write_bytes(data)
    return folder


class TestScan:
    def test_finds_models_and_integer_versions(self, tmp_path):
        version(tmp_path, "cats", 1)
        version(tmp_path, "cats", 12)
        version(tmp_path, "dogs", 3)
        scan = Scanner(tmp_path).scan()
        assert {m: sorted(v) for m, v in scan.items()} == {"cats": [1, 12], "dogs": [3]}
        assert scan["cats"][12].path == tmp_path / "cats" / "12"

    @pytest.mark.parametrize("name", [".5", "0", "-1", "v2", "latest", "1.5", "٣"])
    def test_ignores_hidden_and_non_integer_versions(self, tmp_path, name, caplog):
        version(tmp_path, "cats", 1)
        version(tmp_path, "cats", name)
        version(tmp_path, ".hidden", 1)
        (tmp_path / "cats" / "7").write_text("a file, not a folder")
        scanner = Scanner(tmp_path)
        assert {m: sorted(v) for m, v in scanner.scan().items()} == {"cats": [1]}
        scanner.scan()
        warned = [r for r in caplog.records if "ignored" in r.getMessage()]
        # A hidden folder is ignored quietly (it is how a version is staged); a misnamed one is logged once.
        assert len(warned) == (0 if name.startswith(".") else 1)

    def test_missing_root_is_an_error_that_names_it(self, tmp_path):
        with pytest.raises(RepositoryError, match="no such model repository"):
            Scanner(tmp_path / "nope").scan()

    def test_fingerprint_changes_with_the_files(self, tmp_path):
        folder = version(tmp_path, "cats", 1, {"model.onnx": b"half"})
        before = Scanner(tmp_path).scan()["cats"][1]
        assert Scanner(tmp_path).scan()["cats"][1] == before
        (folder / "model.onnx").write_bytes(b"half and the rest")
        assert Scanner(tmp_path).scan()["cats"][1] != before


class TestPolicy:
    @pytest.mark.parametrize(
        "text, expected",
        [
            ("", {}),
            ("cats=3", {"cats": 3}),
            ("cats=latest, dogs=2", {"cats": None, "dogs": 2}),
        ],
    )
    def test_parses(self, text, expected):
        assert parse_policies(text) == expected

    @pytest.mark.parametrize("text", ["cats", "cats=0", "cats=newest", "=3", "cats=-1"])
    def test_refuses_what_it_cannot_read(self, text):
        with pytest.raises(RepositoryError, match="MODEL=latest or MODEL=N"):
            parse_policies(text)

    def scan(self, tmp_path):
        for n in (1, 2, 3):
            version(tmp_path, "cats", n)
        version(tmp_path, "dogs", 5)
        return Scanner(tmp_path).scan()

    def test_latest_by_default(self, tmp_path):
        assert {m: v.version for m, v in wanted(self.scan(tmp_path), {}).items()} == {"cats": 3, "dogs": 5}

    def test_pinned(self, tmp_path):
        assert wanted(self.scan(tmp_path), {"cats": 2})["cats"].version == 2

    def test_pinned_to_a_missing_version_loads_nothing_new(self, tmp_path):
        assert "cats" not in wanted(self.scan(tmp_path), {"cats": 9})

    def test_a_refused_latest_leaves_the_one_before(self, tmp_path):
        scan = self.scan(tmp_path)
        assert wanted(scan, {}, {scan["cats"][3]})["cats"].version == 2

    def test_a_refused_version_whose_files_changed_is_tried_again(self, tmp_path):
        scan = self.scan(tmp_path)
        refused = {scan["cats"][3]}
        (tmp_path / "cats" / "3" / "model.onnx").write_bytes(b"the copy completed")
        assert wanted(Scanner(tmp_path).scan(), {}, refused)["cats"].version == 3


class TestPublish:
    def staged(self, root: Path, model: str = "cats") -> Path:
        folder = staging_dir(root, model)
        folder.mkdir()
        (folder / MANIFEST_NAME).write_text("{}")
        return folder

    def test_numbers_follow_the_largest_version(self, tmp_path):
        assert publish(self.staged(tmp_path)) == tmp_path / "cats" / "1"
        version(tmp_path, "cats", 7)
        assert publish(self.staged(tmp_path)) == tmp_path / "cats" / "8"
        assert (tmp_path / "cats" / "8" / MANIFEST_NAME).is_file()
        assert [p.name for p in (tmp_path / "cats").iterdir() if p.name.startswith(".")] == []

    def test_a_number_taken_meanwhile_is_skipped(self, tmp_path, monkeypatch):
        import serving.repository.layout as repository

        staged = self.staged(tmp_path)
        version(tmp_path, "cats", 1, {"model.onnx": b"another export's"})
        # The other export took 1 after this one looked: the rename onto it fails and 2 is taken.
        monkeypatch.setattr(repository, "next_version", lambda model_dir: 1)
        assert publish(staged) == tmp_path / "cats" / "2"
        assert (tmp_path / "cats" / "1" / "model.onnx").read_bytes() == b"another export's"

    def test_the_staging_folder_is_invisible_to_a_scan(self, tmp_path):
        staged = self.staged(tmp_path)
        (staged / "model.onnx").write_bytes(b"half")
        assert Scanner(tmp_path).scan() == {}


class TestConfig:
    def test_exactly_one_of_bundle_and_repository(self, tmp_path):
        with pytest.raises(ConfigError, match=r"exactly one of bundle .* and model_repository.*got both"):
            load_config({"bundle": "b", "model_repository": str(tmp_path)}, environ={})
        with pytest.raises(ConfigError, match=r"bundle: Field required; .* model_repository"):
            load_config({}, environ={})

    def test_repository_settings_from_the_environment(self, tmp_path):
        env = {
            "SERVING_MODEL_REPOSITORY": str(tmp_path),
            "SERVING_VERSION_POLICY": "cats=2",
            "SERVING_POLL_S": "0.5",
            "SERVING_MAX_MODEL_BYTES": "1000000",
        }
        c = load_config({}, environ=env)
        assert (c.model_repository, c.version_policy, c.poll_s, c.max_model_bytes) == (tmp_path, "cats=2", 0.5, 10**6)

    def test_a_bad_policy_names_the_setting(self, tmp_path):
        with pytest.raises(ConfigError, match="version_policy: version policy cats='new'"):
            load_config({"model_repository": str(tmp_path), "version_policy": "cats=new"}, environ={})


# The registry, with models that need no ONNX Runtime: a batcher over an identity step.


def fake_model(manifest, name: str, number: int, cost: int = 0) -> ServedModel:
    session = SimpleNamespace(manifest=manifest, precision="fp32", providers=["CPUExecutionProvider"])
    batcher = Batcher(lambda batch: batch, max_batch_views=4, max_delay_us=0, max_queue=4)
    return ServedModel(name, str(number), number, session, batcher, cost)  # type: ignore[arg-type]


@pytest.fixture
def manifest(tiny_bundle):
    return read_manifest(tiny_bundle)


def source(root: Path, model: str, number: int) -> VersionDir:
    return VersionDir(model, number, root / model / str(number), ())


def fake_registry(tmp_path, manifest, fail: set[int] = frozenset(), default_model: str = "") -> Registry:  # type: ignore[assignment]
    """A registry that loads fake models, failing for the version numbers in `fail`."""

    def load(v: VersionDir) -> ServedModel:
        if v.version in fail:
            raise ValueError(f"cannot load {v.version}")
        return fake_model(manifest, v.model, v.version)

    cfg = ServerConfig(model_repository=tmp_path, port=0, metrics_port=None, http_port=0, default_model=default_model)
    return Registry(cfg, Metrics(), load=load)


class TestRegistry:
    def test_unknown_model_or_version_is_not_found_naming_what_is_served(self, tmp_path, manifest):
        reg = fake_registry(tmp_path, manifest)
        reg.sync({"cats": source(tmp_path, "cats", 2)}, {("cats", 2)})
        with reg.acquire("", 0) as m:
            assert (m.name, m.version) == ("cats", "2")
        with reg.acquire("cats", 2) as m:
            assert m.number == 2
        for name, number in (("dogs", 0), ("cats", 1)):
            with pytest.raises(CallFailed) as err, reg.acquire(name, number):
                pass
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            assert "served: cats version 2" in str(err.value)
        reg.close()

    def test_nothing_loaded_is_unavailable(self, tmp_path, manifest):
        with pytest.raises(CallFailed) as err, fake_registry(tmp_path, manifest).acquire():
            pass
        assert err.value.code == grpc.StatusCode.UNAVAILABLE

    def test_several_models_need_a_name(self, tmp_path, manifest):
        reg = fake_registry(tmp_path, manifest)
        reg.sync({m: source(tmp_path, m, 1) for m in ("cats", "dogs")}, {("cats", 1), ("dogs", 1)})
        with pytest.raises(CallFailed) as err, reg.acquire():
            pass
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with reg.acquire("dogs") as m:
            assert m.name == "dogs"
        reg.close()

    def test_the_default_model_answers_calls_that_name_none(self, tmp_path, manifest):
        reg = fake_registry(tmp_path, manifest, default_model="dogs")
        reg.sync({m: source(tmp_path, m, 1) for m in ("cats", "dogs")}, {("cats", 1), ("dogs", 1)})
        with reg.acquire() as m:
            assert m.name == "dogs"
        with reg.acquire("cats") as m:
            assert m.name == "cats"
        reg.close()

    def test_the_old_version_closes_only_after_its_last_call(self, tmp_path, manifest):
        reg = fake_registry(tmp_path, manifest)
        reg.sync({"cats": source(tmp_path, "cats", 1)}, {("cats", 1)})
        with reg.acquire() as old:
            reg.sync({"cats": source(tmp_path, "cats", 2)}, {("cats", 1), ("cats", 2)})
            with reg.acquire() as new:
                assert new.number == 2
            assert not old.batcher.closed  # a call still holds it
            assert old.batcher.submit([[1]])[0].result(10) == [1]
        assert old.batcher.closed
        assert not new.batcher.closed
        reg.close()

    def test_a_failed_load_is_refused_and_the_old_keeps_serving(self, tmp_path, manifest):
        reg = fake_registry(tmp_path, manifest, fail={2})
        reg.sync({"cats": source(tmp_path, "cats", 1)}, {("cats", 1)})
        refused = reg.sync({"cats": source(tmp_path, "cats", 2)}, {("cats", 1), ("cats", 2)})
        assert [(r.source.version, r.reason, r.budget) for r in refused] == [(2, "ValueError: cannot load 2", False)]
        with reg.acquire() as m:
            assert m.number == 1
        assert reg.metrics.model_loads.labels("cats", "failed")._value.get() == 1
        reg.close()

    def test_a_removed_version_is_unloaded(self, tmp_path, manifest):
        reg = fake_registry(tmp_path, manifest)
        reg.sync({"cats": source(tmp_path, "cats", 1), "dogs": source(tmp_path, "dogs", 1)}, {("cats", 1), ("dogs", 1)})
        dogs = reg.served()["dogs"]
        reg.sync({"cats": source(tmp_path, "cats", 1)}, {("cats", 1)})
        assert set(reg.served()) == {"cats"} and dogs.batcher.closed
        reg.close()


class TestWatcher:
    def test_a_broken_newest_version_at_start_leaves_the_one_before_served_at_once(self, tmp_path, manifest):
        for n in (1, 2, 3):
            version(tmp_path, "cats", n)
        reg = fake_registry(tmp_path, manifest, fail={2, 3})
        watcher = Watcher(reg, tmp_path, {}, poll_s=3600)
        watcher.poll()  # one poll, as at start: no waiting for the next one, an hour away
        assert reg.served()["cats"].number == 1
        assert watcher.refusals("cats") == {2: "ValueError: cannot load 2", 3: "ValueError: cannot load 3"}
        reg.close()

    def test_scan_now_returns_once_a_scan_begun_after_it_has_synced(self, tmp_path, manifest):
        version(tmp_path, "cats", 1)
        reg = fake_registry(tmp_path, manifest)
        watcher = Watcher(reg, tmp_path, {}, poll_s=3600)
        watcher.start()
        try:
            for n in (2, 3):
                version(tmp_path, "cats", n)
                assert watcher.scan_now(timeout=60)
                assert reg.served()["cats"].number == n
        finally:
            watcher.stop()
            reg.close()

    def test_scan_now_gives_up_once_stopped(self, tmp_path, manifest):
        watcher = Watcher(fake_registry(tmp_path, manifest), tmp_path, {}, poll_s=3600)
        watcher.stop()  # never started: no scan will come
        assert watcher.scan_now(timeout=60) is False


class TestMemoryBudget:
    def test_estimate_grows_with_the_file_and_the_warm_up_batch(self):
        assert memory_estimate(2_000_000, 32, 64) > memory_estimate(1_000_000, 32, 64)
        assert memory_estimate(1_000_000, 64, 64) > memory_estimate(1_000_000, 32, 64)
        # Runs at once each hold their own activations.
        assert memory_estimate(1_000_000, 32, 64, 2) > memory_estimate(1_000_000, 32, 64, 1)

    def test_a_load_over_the_budget_is_refused_and_the_old_keeps_serving(self, tmp_path, tiny_bundle, caplog):
        for n in (1, 2):
            shutil.copytree(tiny_bundle, tmp_path / "colours" / str(n))
        one = memory_estimate(
            (tiny_bundle / "model.onnx").stat().st_size, read_manifest(tiny_bundle).preprocessing.input_size, 8, 2
        )
        # Room for one version and a half: a switch, which holds two at once, does not fit.
        cfg = server_config(
            model_repository=tmp_path, max_batch_views=8, model_instances=2, max_model_bytes=one * 3 // 2
        )
        metrics = Metrics()
        reg = Registry(cfg, metrics, load=lambda v: open_model(cfg, metrics, v.path, number=v.version))
        present = {("colours", 1), ("colours", 2)}
        assert reg.sync({"colours": source(tmp_path, "colours", 1)}, present) == []
        [refusal] = reg.sync({"colours": source(tmp_path, "colours", 2)}, present)
        assert refusal.source.version == 2 and refusal.budget
        assert "over the memory budget" in refusal.reason and "--max-model-bytes" in refusal.reason
        assert "over the memory budget" in caplog.text
        with reg.acquire() as m:
            assert m.number == 1
        assert metrics.model_loads.labels("colours", "failed")._value.get() == 1
        reg.close()


class TestStagedExportIsAtomic:
    def test_a_reader_never_sees_a_partial_version(self, tmp_path):
        """Many bundles written file by file into staging folders and published, while a reader scans:
        every version it sees has all its files."""
        files = {MANIFEST_NAME: b"{}", "model.onnx": b"x" * 100_000}
        stop = threading.Event()
        partial: list[tuple] = []

        def read():
            scanner = Scanner(tmp_path)
            while not stop.is_set():
                if tmp_path.exists():
                    for versions in scanner.scan().values():
                        partial.extend(v.fingerprint for v in versions.values() if len(v.fingerprint) != 2)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for _ in range(20):
                staged = staging_dir(tmp_path, "cats")
                staged.mkdir()
                for name, data in files.items():
                    (staged / name).write_bytes(data)
                publish(staged)
        finally:
            stop.set()
            reader.join()
        assert partial == []
        assert sorted(int(p.name) for p in (tmp_path / "cats").iterdir()) == list(range(1, 21))
