"""A model repository served live: versions switch under load with no failed call, broken and
half-copied versions are refused, removed ones unloaded, SIGHUP rescans."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from itertools import groupby
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from conftest import serve_argv, served_ports
from onnx import numpy_helper
from test_serving_server import png, wait_until

from serving.bundle.files import sha256_file
from serving.bundle.manifest import MODEL_NAME, read_manifest, write_manifest
from serving.client import Client
from serving.config import ServerConfig
from serving.gen.inference import grpc_service_pb2 as oip
from serving.gen.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from serving.repository.registry import memory_estimate
from serving.server import Server

N_CLIENTS = 16
MODEL = "colours"  # the tiny bundle's name


def shifted_bundle(src: Path, dst: Path, shift: float) -> Path:
    """A copy of `src` whose graph answers differently (its last layer's bias moved by `shift`), with
    the manifest's sha256 to match: a real, valid new version that can be told apart by its answers."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / MODEL_NAME))
    # Back from the softmax to the last layer, past the division by the calibration temperature.
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    while node.op_type != "Gemm":
        node = next(n for n in model.graph.node if node.input[0] in n.output)
    gemm = node
    bias = next(i for i in model.graph.initializer if i.name == gemm.input[2])
    moved = numpy_helper.to_array(bias).copy()
    moved[0] += shift
    bias.CopyFrom(numpy_helper.from_array(moved, bias.name))
    onnx.save(model, str(dst / MODEL_NAME))
    m = read_manifest(dst)
    write_manifest(
        dst, m.model_copy(update={"model": m.model.model_copy(update={"sha256": sha256_file(dst / MODEL_NAME)})})
    )
    return dst


def put_version(bundle: Path, repo: Path, number: int) -> Path:
    """Copy a bundle in as a version the way `trainer export --repository` does: in a hidden folder,
    then one rename."""
    staged = repo / MODEL / f".incoming-{number}"
    shutil.copytree(bundle, staged)
    return staged.rename(repo / MODEL / str(number))


def repository_config(repo: Path, **kw) -> ServerConfig:
    settings = {
        "port": 0,
        "device": "cpu",
        "metrics_port": 0,
        "http_port": 0,
        "max_batch_views": 16,
        "poll_s": 0.05,
        **kw,
    }
    return ServerConfig(model_repository=repo, **settings)


def sample(srv: Server, name: str, **labels: str) -> float:
    return srv.metrics.registry.get_sample_value(name, labels) or 0.0


def refused(srv: Server, number: int) -> list:
    assert srv.watcher is not None
    return [v for v in set(srv.watcher.refused) if v.version == number]


def served_number(srv: Server) -> int | None:
    model = srv.models.served().get(MODEL)
    return None if model is None else model.number


def test_versions_switch_under_load_with_no_failed_call(tmp_path, tiny_bundle, caplog):
    caplog.set_level("INFO", logger="serving")
    repo = tmp_path / "repo"
    shutil.copytree(tiny_bundle, repo / MODEL / "1")
    new = shifted_bundle(tiny_bundle, tmp_path / "new", shift=4.0)
    image = png()
    answers: list[list[tuple[str, list[float]]]] = [[] for _ in range(N_CLIENTS)]
    failures: list[str] = []
    stop = threading.Event()

    with Server(repository_config(repo)) as srv:

        def call(i: int) -> None:
            with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.predict(image)
                    except grpc.RpcError as e:
                        failures.append(f"{e.code().name}: {e.details()}")
                        continue
                    answers[i].append((r.model_version, list(r.probabilities)))

        def all_answered_since(counts: list[int], version: str) -> bool:
            return all(len(a) > n and a[-1][0] == version for a, n in zip(answers, counts, strict=True))

        clients = [threading.Thread(target=call, args=(i,)) for i in range(N_CLIENTS)]
        for t in clients:
            t.start()
        try:
            wait_until(lambda: all(answers), timeout=60)
            with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
                assert c.health(MODEL) == "SERVING"

            # A broken version: its model file does not match the manifest's sha256.
            broken = tmp_path / "broken"
            shutil.copytree(tiny_bundle, broken)
            with open(broken / MODEL_NAME, "ab") as f:
                f.write(b"\0")
            put_version(broken, repo, 2)
            wait_until(lambda: refused(srv, 2), timeout=60)

            # A version still being copied: the manifest is there, the model file half written.
            half = repo / MODEL / "3"
            half.mkdir()
            shutil.copy(new / "manifest.json", half)
            data = (new / MODEL_NAME).read_bytes()
            (half / MODEL_NAME).write_bytes(data[: len(data) // 2])
            truncated = len(data) // 2
            wait_until(
                lambda: any((MODEL_NAME, truncated) == f[:2] for v in refused(srv, 3) for f in v.fingerprint), 60
            )
            assert served_number(srv) == 1
            # The copy completes: its files change, so it is tried again, and it loads.
            (half / MODEL_NAME).write_bytes(data)
            wait_until(lambda: served_number(srv) == 3, timeout=60)
            counts = [len(a) for a in answers]
            wait_until(lambda: all_answered_since(counts, "3"), timeout=60)

            # The old version's folder removed: it is no longer served anyway, nothing changes.
            shutil.rmtree(repo / MODEL / "1")
            polls = srv.watcher.polls
            wait_until(lambda: srv.watcher.polls >= polls + 2, timeout=60)

            # SIGHUP: what the handler calls. A scan follows, which changes nothing.
            srv.reload()
            polls = srv.watcher.polls
            wait_until(lambda: srv.watcher.polls > polls, timeout=60)
            counts = [len(a) for a in answers]
            wait_until(lambda: all_answered_since(counts, "3"), timeout=60)

            with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
                info = c.model_info()
                assert (info.model_name, info.model_version) == (MODEL, "3")
                assert c.predict_batch([image], model=MODEL, version=3).results[0].response.model_version == "3"
                for model, version in (("nope", 0), (MODEL, 1), (MODEL, 2)):
                    with pytest.raises(grpc.RpcError) as err:
                        c.predict(image, model=model, version=version)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                    assert f"served: {MODEL} version 3" in err.value.details()
                assert c.health(MODEL) == "SERVING"
        finally:
            stop.set()
            for t in clients:
                t.join()

        assert sample(srv, "classifier_model_version", model=MODEL) == 3
        assert sample(srv, "classifier_model_loads_total", model=MODEL, result="loaded") == 2  # 1, then 3 once whole
        assert sample(srv, "classifier_model_loads_total", model=MODEL, result="failed") >= 2
        assert sample(srv, "classifier_model_answers_total", model=MODEL, version="3") > 0

    assert failures == []
    first = {version: probs for a in answers for version, probs in reversed(a)}
    assert not np.allclose(first["1"], first["3"], atol=1e-3)  # the two versions answer differently
    for a in answers:
        # Each client switched from old to new exactly once, never back.
        assert [version for version, _ in groupby(v for v, _ in a)] == ["1", "3"]
        # Every answer names the version that produced it.
        for version, probs in a:
            np.testing.assert_allclose(probs, first[version], atol=1e-4)
    log = caplog.text
    assert re.search(rf"refused {MODEL} version 2 .*sha256", log)
    assert re.search(rf"refused {MODEL} version 3 .*sha256", log)
    assert f"serving {MODEL} version 3" in log and "was version 1" in log
    assert f"unloaded {MODEL} version 1" in log


def test_a_refused_version_is_not_retried_until_its_files_change(tmp_path, tiny_bundle, caplog):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_bundle, repo / MODEL / "1")
    (repo / MODEL / "2").mkdir()
    shutil.copy(tiny_bundle / "manifest.json", repo / MODEL / "2")  # no model file
    with Server(repository_config(repo, poll_s=0)) as srv:
        assert srv.watcher is not None
        for _ in range(3):
            srv.watcher.poll()
        assert caplog.text.count(f"refused {MODEL} version 2") == 1
        assert served_number(srv) == 1


def test_pinning_the_old_version_rolls_back(tmp_path, tiny_bundle):
    repo = tmp_path / "repo"
    for n in (1, 2):
        shutil.copytree(tiny_bundle, repo / MODEL / str(n))
    with Server(repository_config(repo, poll_s=0, version_policy=f"{MODEL}=1")) as srv:
        assert served_number(srv) == 1
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert c.predict(png()).model_version == "1"


def test_removing_the_served_version_falls_back_to_the_one_before(tmp_path, tiny_bundle):
    repo = tmp_path / "repo"
    for n in (1, 2):
        shutil.copytree(tiny_bundle, repo / MODEL / str(n))
    with Server(repository_config(repo, poll_s=0)) as srv:
        assert served_number(srv) == 2
        shutil.rmtree(repo / MODEL / "2")
        srv.watcher.poll()
        assert served_number(srv) == 1
        shutil.rmtree(repo / MODEL / "1")
        srv.watcher.poll()
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.predict(png())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "every version was removed or refused" in err.value.details()
            assert c.health(MODEL) == "NOT_SERVING" and c.health() == "NOT_SERVING"


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_loads_a_new_version_in_a_running_serve(tmp_path, tiny_bundle):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_bundle, repo / MODEL / "1")
    # --poll-s 0: the repository is scanned only when SIGHUP asks.
    argv = serve_argv(repo, "--poll-s", "0", "--max-batch-views", "8", repository=True)
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = server.stdout.readline()
        port = served_ports(line).get("grpc")
        assert port, line + server.stderr.read()
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            assert c.model_info().model_version == "1"
            put_version(tiny_bundle, repo, 2)
            server.send_signal(signal.SIGHUP)
            wait_until(lambda: c.model_info().model_version == "2", timeout=60)
            assert c.predict(png()).model_version == "2"
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_a_version_over_the_memory_budget_loads_once_memory_is_freed(tmp_path, tiny_bundle, caplog):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_bundle, repo / MODEL / "1")
    one = memory_estimate(
        (tiny_bundle / MODEL_NAME).stat().st_size, read_manifest(tiny_bundle).preprocessing.input_size, 8, 2
    )
    cfg = repository_config(repo, poll_s=0, max_batch_views=8, model_instances=2, max_model_bytes=one * 3 // 2)
    with Server(cfg) as srv:
        assert srv.watcher is not None and served_number(srv) == 1
        put_version(tiny_bundle, repo, 2)
        for _ in range(3):
            srv.watcher.poll()
        assert served_number(srv) == 1
        assert caplog.text.count("over the memory budget") == 1  # refused once, not on every poll
        # Rolling back the hard way: the served version's folder removed frees its memory.
        shutil.rmtree(repo / MODEL / "1")
        srv.watcher.poll()
        srv.watcher.poll()
        assert served_number(srv) == 2


def test_models_are_named_by_their_repository_folder(tmp_path, tiny_bundle):
    repo = tmp_path / "repo"
    for name in ("shapes", "hues"):  # both hold the bundle whose manifest says "colours"
        shutil.copytree(tiny_bundle, repo / name / "4")
    with Server(repository_config(repo, poll_s=0)) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
        reply = c.predict(png(), model="hues")
        assert (reply.model_name, reply.model_version) == ("hues", "4")
        assert c.model_info(model="shapes", version=4).model_name == "shapes"
        with pytest.raises(grpc.RpcError) as err:
            c.predict(png())  # two models: the call must name one
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        shutil.rmtree(repo / "hues")
        srv.watcher.poll()
        assert set(srv.models.served()) == {"shapes"}
        assert (c.health("hues"), c.health("shapes")) == ("NOT_SERVING", "SERVING")
        assert c.predict(png()).model_name == "shapes"  # now the only one


def reorder_classes(folder: Path) -> None:
    m = read_manifest(folder)
    write_manifest(folder, m.model_copy(update={"classes": m.classes[::-1]}))


def truncate_model(folder: Path) -> None:
    with open(folder / MODEL_NAME, "r+b") as f:
        f.truncate(1000)


class TestServedFilesEditedInPlace:
    """The served version's own folder changed under it: noticed at the next poll, checked once per change."""

    @pytest.mark.parametrize(
        ("edit", "changed", "why"),
        [
            (truncate_model, MODEL_NAME, "does not match the manifest's"),
            (reorder_classes, "manifest.json", "classes not as embedded"),
        ],
    )
    def test_a_broken_edit_is_refused_and_the_copy_in_memory_keeps_serving(
        self, tmp_path, tiny_bundle, caplog, edit, changed, why
    ):
        caplog.set_level("INFO", logger="serving")
        repo = tmp_path / "repo"
        for n in (1, 2):  # an older version on disk, which must not take over
            shutil.copytree(tiny_bundle, repo / MODEL / str(n))
        served = repo / MODEL / "2"
        with Server(repository_config(repo, poll_s=0)) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert srv.watcher is not None
            before = c.predict(png())
            edit(served)
            for _ in range(3):
                srv.watcher.poll()

            assert f"{MODEL}/2, served now: {changed} changed on disk" in caplog.text
            assert caplog.text.count(f"refused {MODEL} version 2") == 1  # checked once, not on every poll
            assert sample(srv, "classifier_model_files_changed_total", model=MODEL) == 1
            [(number, reason)] = srv.watcher.refusals(MODEL).items()
            assert number == 2 and why in reason and str(repo) not in reason
            after = c.predict(png())
            assert after.model_version == "2"
            np.testing.assert_allclose(after.probabilities, before.probabilities, atol=1e-6)
            # RepositoryIndex says so too: the version answers (READY), with why its files were refused.
            index = GRPCInferenceServiceStub(c.channel).RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
            [entry] = [m for m in index.models if m.version == "2"]
            assert entry.state == "READY" and why in entry.reason and str(repo) not in entry.reason

            shutil.rmtree(served)  # put back as it was: changed again, checked again, nothing to load
            shutil.copytree(tiny_bundle, served)
            srv.watcher.poll()
            assert sample(srv, "classifier_model_files_changed_total", model=MODEL) == 2
            assert srv.watcher.refusals(MODEL) == {}
            assert sample(srv, "classifier_model_loads_total", model=MODEL, result="loaded") == 1
            assert c.predict(png()).model_version == "2"

    def test_another_valid_bundle_written_in_place_is_loaded(self, tmp_path, tiny_bundle):
        repo = tmp_path / "repo"
        served = shutil.copytree(tiny_bundle, repo / MODEL / "1")
        new = shifted_bundle(tiny_bundle, tmp_path / "new", shift=4.0)
        with Server(repository_config(repo, poll_s=0)) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert srv.watcher is not None
            before = c.predict(png())
            for name in (MODEL_NAME, "manifest.json"):
                shutil.copyfile(new / name, served / name)
            srv.watcher.poll()
            after = c.predict(png())
            assert after.model_version == "1"
            assert not np.allclose(after.probabilities, before.probabilities, atol=1e-3)
            assert sample(srv, "classifier_model_loads_total", model=MODEL, result="loaded") == 2
            assert sample(srv, "classifier_model_files_changed_total", model=MODEL) == 1
            assert srv.watcher.refusals(MODEL) == {}
