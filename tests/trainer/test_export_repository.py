"""`trainer export --repository`: a run exported as the next version of a model repository, moved in
whole, so that a server watching the repository never sees half a version."""

from __future__ import annotations

import threading

import pytest

from serving.bundle.manifest import MANIFEST_NAME, MODEL_NAME, load_bundle
from serving.repository.layout import Scanner
from trainer.cli import main
from trainer.commands import export_run
from trainer.outputs.export import ExportError


def test_out_and_repository_are_exclusive(tmp_path, capsys):
    # Refused before anything is read or written, in one line (the flags come from ExportOptions).
    assert main(["export", "--run", str(tmp_path), "--out", "a", "--repository", "b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainer: --out and --repository both name where the bundle goes") and err.count("\n") == 1
    with pytest.raises(ExportError, match="--out and --repository both name where the bundle goes"):
        export_run(tmp_path, tmp_path / "a", repository=tmp_path / "b")


def test_exports_become_the_next_versions_and_appear_whole(trainer_run, tmp_path):
    repo = tmp_path / "repo"
    (repo / "digits" / "7").mkdir(parents=True)  # another model's versions do not count
    seen: list[tuple] = []
    stop = threading.Event()

    def watch():
        scanner = Scanner(repo)
        while not stop.is_set():
            for versions in scanner.scan().values():
                seen.extend(v.fingerprint for v in versions.values() if v.model == "colours")
            stop.wait(0.002)  # often enough to catch a partial version, without taking a core from the export

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        paths = [export_run(trainer_run.path, repository=repo, name="colours", log=lambda _: None) for _ in range(2)]
    finally:
        stop.set()
        reader.join()
    assert paths == [repo / "colours" / "1", repo / "colours" / "2"]
    for path in paths:
        manifest, _ = load_bundle(path)
        assert manifest.name == "colours"
    assert seen, "the reader never saw a version"
    assert all({MANIFEST_NAME, MODEL_NAME} <= {name for name, *_ in fp} for fp in seen)
    assert sorted(p.name for p in (repo / "colours").iterdir()) == ["1", "2"]  # no staging folder left
