"""The models being served, by name: which version answers each call, and switching versions live.

A switch loads and warms the new version beside the old one, outside any lock, then swaps the two
under the lock in one assignment: calls that begin after it get the new version, calls already
holding the old one finish on it, and the old one's batcher is closed when its last call returns.
A version that cannot be loaded (bad checksum, wrong shape, missing file, over the memory budget)
is refused with its reason logged and counted; whatever was served before keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc

from serving.bundle.manifest import BundleError, load_bundle, model_file, read_manifest
from serving.bundle.session import ModelSession, choose_providers
from serving.config import JSON_PARSERS, ServerConfig, batch_views, decoders, json_limit
from serving.engine.batcher import Batcher, BatchStats
from serving.engine.errors import CallFailed
from serving.engine.predict import run_batch
from serving.engine.statistics import ModelStats
from serving.monitoring import Metrics
from serving.protocols.echo import echo
from serving.repository.layout import VersionDir, changed_files

log = logging.getLogger("serving")

# Resident memory of a loaded, warmed version: ONNX Runtime holds the weights (about twice the model
# file: initializers plus pre-packed copies for some kernels) and an arena sized by the largest batch
# it ran, the warm-up's max_batch_views views. Fitted to scripts/model_memory.py on EfficientNet-Lite0
# bundles at 32 and 64 px with 64 views (the second version loaded: +51 and +99 MiB for an 18 MiB
# file; README, "What two versions cost"), then rounded up so that a budget refuses a little early
# rather than the kernel killing the server.
WEIGHT_FACTOR = 2.5  # resident bytes per byte of model file
ACTIVATION_BYTES = 300  # arena bytes per input pixel (size x size) per view of the warm-up batch


# The rest of the README's memory formula ("What a request may cost"): the server's process before any
# model or request (Python, gRPC, ONNX Runtime) with the decoders' zygote, and the copies of a request
# each handler thread may hold at once (gRPC's buffers, the serialized and parsed message, its image
# field), measured in tests/serving/test_serving_decoders.py.
BASE_BYTES = 400 * 2**20
REQUEST_COPIES = 5
# HTTP/REST (serving/protocols/http.py): each of its --workers places holds a body and its copies as a
# gRPC handler does, and at most JSON_PARSERS requests have their JSON parsed at once, which takes up
# to JSON_EXPANSION times its size in Python objects (24x measured, for a list of empty objects).
JSON_EXPANSION = 25


def memory_bound(config: ServerConfig, model_costs: Iterable[int]) -> int:
    """The most the whole server (its process, the zygote and the decoding processes, as PSS) may
    use, in bytes, with versions of these estimated costs loaded: the README's formula."""
    http = 0
    if config.http_port is not None:
        http = config.workers * REQUEST_COPIES * config.max_message_bytes
        http += JSON_PARSERS * JSON_EXPANSION * json_limit(config)
    return (
        BASE_BYTES
        + sum(model_costs)
        + config.workers * REQUEST_COPIES * config.max_message_bytes
        + http
        + decoders(config) * config.decode_worker_memory_mb * 2**20
    )


def memory_estimate(model_bytes: int, input_size: int, batch_views: int, instances: int = 1) -> int:
    """Estimated resident bytes of one loaded version whose model file has `model_bytes`, whose
    graph takes `input_size` px images, in batches of `batch_views` views run `instances` at once."""
    return int(WEIGHT_FACTOR * model_bytes + ACTIVATION_BYTES * input_size**2 * batch_views * instances)


@dataclass(eq=False)
class ServedModel:
    """One loaded version. `version` is what answers name: the repository's version number as text,
    or the manifest's version for a --bundle server (whose `number` is None)."""

    name: str
    version: str
    number: int | None
    session: ModelSession
    batcher: Batcher
    cost_bytes: int
    source: VersionDir | None = None
    stats: ModelStats = field(default_factory=ModelStats)  # ModelStatistics' totals, both protocols
    in_flight: int = 0
    retired: bool = False
    closed: bool = field(default=False)


def open_model(
    config: ServerConfig,
    metrics: Metrics,
    bundle_dir: Path,
    *,
    name: str | None = None,
    number: int | None = None,
    session: ModelSession | None = None,
) -> ServedModel:
    """Load a bundle (unless a session is given), warm it with a full batch and start its batcher.
    `name` and `number`: its model folder and version in a repository; by default the manifest's."""
    if session is None:
        session = ModelSession(
            bundle_dir,
            device=config.device,
            precision=config.precision,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
            spinning=config.spinning,
        )
    m = session.manifest
    max_views = batch_views(config, len(m.tta.views), "CUDAExecutionProvider" in session.providers)
    # A full batch, so that the first real ones pay no allocation or kernel-selection cost.
    session.warm_up(batch=max(1, max_views // len(m.tta.views)))
    stats = ModelStats()

    def on_batch(batch: BatchStats) -> None:
        metrics.observe_batch(batch)
        stats.observe_batch(batch)

    batcher = Batcher(
        partial(run_batch, session),
        max_batch_views=max_views,
        max_delay_us=config.max_delay_us,
        max_queue=config.max_queue,
        on_batch=on_batch,
        instances=config.model_instances,
    )
    cost = memory_estimate(
        session.model_path.stat().st_size, m.preprocessing.input_size, max_views, config.model_instances
    )
    version = m.version if number is None else str(number)
    return ServedModel(name or m.name, version, number, session, batcher, cost, stats=stats)


def _cuda(device: str) -> bool:
    """Whether a version loaded for `device` will run on CUDA (a load for an unusable device fails anyway)."""
    try:
        return "CUDAExecutionProvider" in choose_providers(device)
    except BundleError:
        return False


@dataclass(frozen=True)
class Refusal:
    """A version that was not loaded, and why. `budget`: refused for --max-model-bytes, so worth trying
    again once memory is freed, whereas a broken bundle is worth trying again only once its files change.
    `served`: the files of the version served now, changed in place; the copy in memory keeps serving."""

    source: VersionDir
    reason: str
    budget: bool = False
    served: bool = False


class Registry:
    """The served models. `acquire` lends one to a call; `install` and `sync` change what is served."""

    def __init__(
        self,
        config: ServerConfig,
        metrics: Metrics,
        *,
        on_change: Callable[[Mapping[str, ServedModel]], None] = lambda served: None,
        load: Callable[[VersionDir], ServedModel] | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self._on_change = on_change
        self._load = load or (lambda v: open_model(config, metrics, v.path, name=v.model, number=v.version))
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one sync at a time (the poller and SIGHUP may both ask)
        self._served: dict[str, ServedModel] = {}
        self._loaded: list[ServedModel] = []  # served or retiring, not yet closed: what memory holds
        self._ever_served = False
        self.unloads = 0  # versions closed so far: memory freed since a load was refused for its budget

    # What calls see.

    def served(self) -> dict[str, ServedModel]:
        with self._lock:
            return dict(self._served)

    def default(self) -> ServedModel | None:
        """The model a call that names none gets: the only one served, else None."""
        with self._lock:
            return next(iter(self._served.values())) if len(self._served) == 1 else None

    def queue_depth(self) -> int:
        with self._lock:
            return sum(m.batcher.depth for m in self._loaded)

    @contextmanager
    def acquire(self, name: str = "", version: int = 0) -> Iterator[ServedModel]:
        """The model that answers a call for `name` (empty: the only one) at `version` (0: the one its
        policy serves), held until the block ends; raises CallFailed (UNAVAILABLE, NOT_FOUND,
        INVALID_ARGUMENT) saying what is served."""
        with self._lock:
            model = self._find(name, version)
            model.in_flight += 1
        try:
            yield model
        finally:
            with self._lock:
                model.in_flight -= 1
                done = model.retired and model.in_flight == 0 and not model.closed
                if done:
                    model.closed = True
            if done:
                self._close(model)

    def _find(self, name: str, version: int) -> ServedModel:
        if not self._served:
            raise CallFailed(
                grpc.StatusCode.UNAVAILABLE,
                "no model is served now: every version was removed or refused; retry later or on another replica"
                if self._ever_served
                else "the model is still loading; retry shortly (health reports SERVING once it is ready)",
            )
        what = ", ".join(f"{m.name} version {m.version}" for m in self._served.values())
        if not name:
            if len(self._served) > 1 and not self.config.default_model:
                raise CallFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"this server serves several models ({what}): name one in the request's `model` field "
                    "(or start it with --default-model)",
                )
            name = self.config.default_model if len(self._served) > 1 else next(iter(self._served))
        model = self._served.get(name)
        if model is None:
            # Triton's words, which its users search for.
            raise CallFailed(
                grpc.StatusCode.NOT_FOUND, f"Request for unknown model: {echo(name)} is not found; served: {what}"
            )
        if version and model.number != version:
            raise CallFailed(
                grpc.StatusCode.NOT_FOUND,
                f"{name} version {version} is not served; served: {what} (leave version 0 for the policy's)",
            )
        return model

    # What changes it.

    def install(self, model: ServedModel) -> None:
        """Serve one fixed model (--bundle): no repository, never switched."""
        with self._lock:
            self._ever_served = True
            self._served = {model.name: model}
            self._loaded.append(model)
            served = dict(self._served)
        self._loaded_ok(model, None)
        self._on_change(served)

    def sync(self, wanted: Mapping[str, VersionDir], present: set[tuple[str, int]]) -> list[Refusal]:
        """Load what `wanted` names and is not served yet, swap each in once warm, and unload a served
        version whose folder is no longer `present` (model, version) with nothing to replace it. A
        served version whose files changed is loaded again if they no longer hold the bundle served.
        Returns the versions refused, with their reasons; the models they were meant to replace keep
        serving."""
        refused: list[Refusal] = []
        with self._sync_lock:
            for name, source in sorted(wanted.items()):
                current = self.served().get(name)
                in_place = False  # the served version's own folder, edited
                if current is not None and current.number == source.version:
                    if current.source == source or not self._changed_in_place(current, source):
                        continue
                    in_place = True
                reason = self._over_budget(source)
                budget = reason is not None
                if reason is None:
                    try:
                        model = self._load(source)
                    except Exception as e:  # BundleError, or ONNX Runtime failing in ways of its own
                        reason = str(e) if isinstance(e, BundleError) else f"{type(e).__name__}: {e}"
                if reason is not None:
                    kept = "; the copy loaded before its files changed keeps serving" if in_place else ""
                    log.error("refused %s version %d (%s): %s%s", name, source.version, source.path, reason, kept)
                    self.metrics.model_loads.labels(name, "failed").inc()
                    # Callers read the reason (RepositoryIndex): the repository's own path is no business of theirs.
                    reason = reason.replace(f"{source.path.parent.parent}{os.sep}", "")
                    refused.append(Refusal(source, reason, budget, served=in_place))
                    continue
                model.source = source
                self._swap(name, model)
            with self._lock:
                gone = [m for m in self._served.values() if m.number is not None and (m.name, m.number) not in present]
            for model in gone:
                self._unserve(model, f"its folder {model.source.path if model.source else ''} was removed")
        return refused

    def _changed_in_place(self, model: ServedModel, source: VersionDir) -> bool:
        """Whether the folder of the served `model`, whose files changed since it was loaded or last
        checked (`source`: as they are now), no longer holds the bundle in memory: it is broken now, or
        holds another valid one. Logged and counted; checked once per change, not on every poll."""
        before = model.source.fingerprint if model.source is not None else ()
        log.warning(
            "%s/%d, served now: %s changed on disk; checking the bundle again",
            source.model,
            source.version,
            ", ".join(changed_files(before, source.fingerprint)),
        )
        self.metrics.files_changed.labels(model.name).inc()
        model.source = source
        try:
            manifest, _ = load_bundle(source.path, model.session.precision)
        except BundleError:
            return True  # loading it refuses it, saying why
        if manifest == model.session.manifest:
            log.info("%s/%d: its files hold the bundle served; nothing to do", source.model, source.version)
            return False
        return True

    def _over_budget(self, source: VersionDir) -> str | None:
        """Why loading `source` would exceed --max-model-bytes, or None."""
        budget = self.config.max_model_bytes
        if budget is None:
            return None
        try:
            manifest = read_manifest(source.path)
            size = (source.path / model_file(manifest, self.config.precision)[0]).stat().st_size
        except (BundleError, OSError):
            return None  # the load itself names what is wrong
        cost = memory_estimate(
            size,
            manifest.preprocessing.input_size,
            batch_views(self.config, len(manifest.tta.views), _cuda(self.config.device)),
            self.config.model_instances,
        )
        with self._lock:
            held = sum(m.cost_bytes for m in self._loaded)
        if held + cost > budget:
            return (
                f"over the memory budget: it would take about {cost / 2**20:.0f} MiB beside the "
                f"{held / 2**20:.0f} MiB loaded now, more than --max-model-bytes {budget / 2**20:.0f} MiB; "
                "raise the budget, or unload a version first (remove its folder or pin another)"
            )
        return None

    def _swap(self, name: str, model: ServedModel) -> None:
        with self._lock:
            old = self._served.get(name)
            self._served[name] = model
            self._loaded.append(model)
            self._ever_served = True
            served = dict(self._served)
        self._loaded_ok(model, old)
        self._on_change(served)
        if old is not None:
            self._retire(old)

    def unserve(self, name: str, why: str) -> None:
        """Stop serving `name`, if it is served; calls holding it finish first."""
        model = self.served().get(name)
        if model is not None:
            self._unserve(model, why)

    def _unserve(self, model: ServedModel, why: str) -> None:
        with self._lock:
            if self._served.get(model.name) is not model:
                return
            del self._served[model.name]
            served = dict(self._served)
        log.info("stopped serving %s version %s: %s", model.name, model.version, why)
        with suppress(KeyError):  # a --bundle model has no version number
            self.metrics.model_version.remove(model.name)
        self._on_change(served)
        self._retire(model)

    def _loaded_ok(self, model: ServedModel, old: ServedModel | None) -> None:
        self.metrics.model_loads.labels(model.name, "loaded").inc()
        if model.number is not None:
            self.metrics.model_version.labels(model.name).set(model.number)
        s = model.session
        self.metrics.model_loaded(
            s.manifest, precision=s.precision, sha256=model_file(s.manifest, s.precision)[1], providers=s.providers
        )
        was = "" if old is None else f", was version {old.version}"
        log.info(
            "serving %s version %s (%s, %s; about %.0f MiB%s)",
            model.name,
            model.version,
            s.precision,
            ", ".join(s.providers),
            model.cost_bytes / 2**20,
            was,
        )

    def _retire(self, model: ServedModel) -> None:
        """No new calls get `model`; it is closed once those holding it are done."""
        with self._lock:
            model.retired = True
            done = model.in_flight == 0 and not model.closed
            if done:
                model.closed = True
        if done:
            self._close(model)

    def _close(self, model: ServedModel) -> None:
        model.batcher.close()
        with self._lock:
            if model in self._loaded:
                self._loaded.remove(model)
            self.unloads += 1
        log.info("unloaded %s version %s", model.name, model.version)

    def close(self) -> None:
        """Close every batcher (at server stop, once no handler waits on one)."""
        with self._lock:
            models, self._loaded, self._served = list(self._loaded), [], {}
            for m in models:
                m.closed = True
        for m in models:
            m.batcher.close()
