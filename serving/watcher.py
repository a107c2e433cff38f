"""Keeps a Registry in step with a model repository: a scan every `poll_s` seconds and on request
(SIGHUP), each followed by a sync of what the version policies want.

A refused version is remembered with its files' fingerprint: it is not tried (or logged) again on
every poll, only once its files change, as they do when a half-copied bundle is completed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from serving.models import Registry
from serving.repository import RepositoryError, Scanner, VersionDir, wanted

log = logging.getLogger("serving")


class Watcher:
    def __init__(self, registry: Registry, root: Path, policies: dict[str, int | None], *, poll_s: float):
        self.registry = registry
        self.scanner = Scanner(root)
        self.policies = policies
        self.poll_s = poll_s
        self.refused: set[VersionDir] = set()
        self._over_budget: dict[VersionDir, int] = {}  # refused for memory -> registry.unloads then
        self._missing_pins: set[tuple[str, int]] = set()  # warned about once
        self.polls = 0  # scans completed, for tests and logs
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        """Scan once and sync the registry to it."""
        try:
            scan = self.scanner.scan()
        except (RepositoryError, OSError) as e:
            log.error("cannot scan the model repository: %s; what is served keeps serving", e)
            return
        present = {(model, n) for model, versions in scan.items() for n in versions}
        # Fingerprints of versions gone from disk need not be remembered; a version refused for the memory
        # budget is tried again once a version was unloaded since.
        self._over_budget = {v: n for v, n in self._over_budget.items() if n == self.registry.unloads}
        self.refused = {v for v in self.refused if scan.get(v.model, {}).get(v.version) == v}
        missing = {(m, pin) for m, pin in self.policies.items() if pin is not None and pin not in scan.get(m, {})}
        for model, pin in sorted(missing - self._missing_pins):
            log.warning("%s is pinned to version %d, which is not in the repository; what is served stays", model, pin)
        self._missing_pins = missing
        for refusal in self.registry.sync(wanted(scan, self.policies, self.refused | set(self._over_budget)), present):
            if refusal.budget:
                self._over_budget[refusal.source] = self.registry.unloads
            else:
                self.refused.add(refusal.source)
        self.polls += 1

    def reload(self) -> None:
        """Ask for a scan now (what SIGHUP does); returns at once, safe in a signal handler."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="repository", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # poll_s 0: only when asked (SIGHUP).
            self._wake.wait(self.poll_s or None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll()
            except Exception:  # a bug here must not stop the polling for good
                log.exception("polling the model repository failed")
