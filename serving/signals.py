"""The signals `serving serve` answers, handled from the first instant of the process.

SIGTERM and SIGINT stop the server gracefully (serving/server.py `serve`); SIGHUP scans the model
repository at once. Left at Python's defaults until a server exists, SIGHUP and SIGTERM would kill
the process and SIGINT would raise KeyboardInterrupt wherever it landed, and importing grpc, numpy
and onnxruntime comes first (about half a second on 2 cores): the README's "publish a version,
then send SIGHUP" would kill a server just started. So the `serving` command installs these
handlers before those imports, and this module imports only the standard library.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType


class Signals:
    """What the process was asked to do. SIGTERM and SIGINT set `stop` (`received` names which);
    SIGHUP calls `on_reload`, which does nothing until a server sets it: one still starting scans its
    repository anyway when it loads."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.received = ""
        self.on_reload: Callable[[], None] = lambda: None

    def install(self) -> Signals:
        """Handle the three signals in this process from now on; from the main thread only, as Python
        requires."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        return self

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        self.stop.set()

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        self.on_reload()
