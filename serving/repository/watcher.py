"""Keeps a Registry in step with a model repository: a scan every `poll_s` seconds and on request
(SIGHUP, or RepositoryModelLoad, which waits for it), each followed by a sync of what the version
policies want.

A refused version is remembered with its files' fingerprint: it is not tried (or logged) again on
every poll, only once its files change, as they do when a half-copied bundle is completed. So is the
served version's folder edited in place into something that cannot be loaded, but that refusal
leaves it served: the copy in memory needs no file, and its reason is reported all the same.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from serving.repository.layout import RepositoryError, Scanner, VersionDir, wanted
from serving.repository.registry import Registry

log = logging.getLogger("serving")


class Watcher:
    def __init__(self, registry: Registry, root: Path, policies: dict[str, int | None], *, poll_s: float):
        self.registry = registry
        self.scanner = Scanner(root)
        self.policies = policies
        self.poll_s = poll_s
        self.refused: dict[VersionDir, str] = {}  # refused -> why
        self._edits: dict[VersionDir, str] = {}  # served versions' folders refused after an edit in place -> why
        self._over_budget: dict[VersionDir, tuple[int, str]] = {}  # refused for memory -> (registry.unloads then, why)
        self._missing_pins: set[tuple[str, int]] = set()  # warned about once
        # Models unloaded by RepositoryModelUnload: polls leave them unserved until a load names them.
        self.unloaded: set[str] = set()
        self.polls = 0  # scans completed, for tests and logs
        self._wake = threading.Event()
        self._scans = threading.Condition()  # guards the two counts below
        self._began = self._ended = 0  # scans of the polling thread begun and ended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        """Scan once and sync the registry to it."""
        try:
            scan = self.scanner.scan()
        except (RepositoryError, OSError) as e:
            log.error("cannot scan the model repository: %s; what is served keeps serving", e)
            return
        unloaded = frozenset(self.unloaded)  # a copy: calls change the set while this runs
        for name in unloaded:
            self.registry.unserve(name, "unloaded by RepositoryModelUnload; RepositoryModelLoad serves it again")
        scan = {model: versions for model, versions in scan.items() if model not in unloaded}
        present = {(model, n) for model, versions in scan.items() for n in versions}
        # Fingerprints of versions gone from disk need not be remembered; a version refused for the memory
        # budget is tried again once a version was unloaded since.
        self._over_budget = {v: nw for v, nw in self._over_budget.items() if nw[0] == self.registry.unloads}
        self.refused = {v: why for v, why in self.refused.items() if scan.get(v.model, {}).get(v.version) == v}
        self._edits = {v: why for v, why in self._edits.items() if scan.get(v.model, {}).get(v.version) == v}
        missing = {(m, pin) for m, pin in self.policies.items() if pin is not None and pin not in scan.get(m, {})}
        for model, pin in sorted(missing - self._missing_pins):
            log.warning("%s is pinned to version %d, which is not in the repository; what is served stays", model, pin)
        self._missing_pins = missing
        # A refused version can leave an older one wanted (the newest broken, the one before it fine): sync
        # again at once rather than at the next poll, which may be an hour away. Each round refuses at
        # least one more version, so this ends.
        refusals = self.registry.sync(wanted(scan, self.policies, {*self.refused, *self._over_budget}), present)
        while refusals:
            for refusal in refusals:
                if refusal.served:  # not one to avoid: what is served stays served
                    self._edits[refusal.source] = refusal.reason
                elif refusal.budget:
                    self._over_budget[refusal.source] = (self.registry.unloads, refusal.reason)
                else:
                    self.refused[refusal.source] = refusal.reason
            refusals = self.registry.sync(wanted(scan, self.policies, {*self.refused, *self._over_budget}), present)
        self.polls += 1

    def reload(self) -> None:
        """Ask for a scan now (what SIGHUP does); returns at once, safe in a signal handler."""
        self._wake.set()

    def scan_now(self, timeout: float | None = None) -> bool:
        """Ask for a scan and wait until one begun after this call has ended, so that what was on disk
        when it was called is loaded or refused. False when `timeout` (seconds) passed first or the
        watcher stopped."""
        with self._scans:
            target = self._began + 1
            self._wake.set()
            return self._scans.wait_for(lambda: self._ended >= target or self._stop.is_set(), timeout) and (
                self._ended >= target
            )

    def refusals(self, model: str) -> dict[int, str]:
        """Why each refused version of `model` still on disk was refused, by version number; the served
        one's too, when its files were edited in place into what cannot be loaded."""
        why = {v.version: reason for v, reason in self.refused.items() if v.model == model}
        why |= {v.version: reason for v, reason in self._edits.items() if v.model == model}
        return why | {v.version: reason for v, (_, reason) in self._over_budget.items() if v.model == model}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="repository", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._scans:
            self._scans.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # poll_s 0: only when asked (SIGHUP).
            self._wake.wait(self.poll_s or None)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._scans:
                self._began += 1
            try:
                self.poll()
            except Exception:  # a bug here must not stop the polling for good
                log.exception("polling the model repository failed")
            finally:
                with self._scans:
                    self._ended += 1
                    self._scans.notify_all()
