"""Pillow's and libtiff's complaints about hostile images: counted by the server, not printed.

A mutated TIFF makes libtiff print "TIFFFetchNormalTag: Incorrect count ..." straight to stderr, and
Pillow adds Python warnings ("Tag data larger than file") and log records. Under attack that floods
the server log with text an attacker chose. Inside `counted(sink)` each such message calls
`sink(source)` instead (source: "warning", "log" or "libtiff"); outside it, in the trainer for
instance, they reach stderr as before. The sink is per thread: decoding happens in the handler
thread, so each server counts only its own calls' messages.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Sink = Callable[[str], None]

_local = threading.local()
_install_lock = threading.Lock()
_installed = False
# libtiff's handler type: void (*)(const char *module, const char *fmt, va_list ap).
_TIFF_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
_tiff_callbacks: list = []  # kept alive for as long as libtiff may call them


@contextmanager
def counted(sink: Sink) -> Iterator[None]:
    """Within the block, in this thread, decoder messages go to `sink` instead of stderr."""
    install()
    previous = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = previous


def _current() -> Sink | None:
    return getattr(_local, "sink", None)


def install() -> None:
    """Route Pillow's warnings, Pillow's log records and libtiff's messages through this module
    (once per process). Messages outside `counted` keep their usual way out."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        _route_warnings()
        _route_pillow_logs()
        _route_libtiff()


def _route_warnings() -> None:
    # "always": by default Python shows a warning once per code location, and we count every one.
    warnings.filterwarnings("always", module=r"PIL(\.|$)")
    original = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        sink = _current()
        if sink is not None and _from_pillow(filename):
            sink("warning")
            return
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _from_pillow(filename: str) -> bool:
    return "/PIL/" in filename.replace("\\", "/")


def _route_pillow_logs() -> None:
    # A logger's filters see only records logged to that very logger, so every Pillow module's gets one.
    from PIL import Image

    Image.init()  # imports every plugin, and so creates its logger
    log_filter = _PillowLogFilter()
    names = [name for name in logging.root.manager.loggerDict if name == "PIL" or name.startswith("PIL.")]
    for name in names:
        logging.getLogger(name).addFilter(log_filter)


class _PillowLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        sink = _current()
        if sink is None or record.levelno < logging.WARNING:
            return True
        sink("log")
        return False


def _route_libtiff() -> None:
    library = _libtiff()
    if library is None:
        return

    def handler(module, fmt, args):
        sink = _current()
        if sink is not None:
            sink("libtiff")
        else:  # as libtiff would, less the formatting of its arguments (a va_list ctypes cannot read)
            print(
                f"{(module or b'libtiff').decode(errors='replace')}: {(fmt or b'').decode(errors='replace')}",
                file=sys.stderr,
            )

    callback = _TIFF_HANDLER(handler)
    _tiff_callbacks.append(callback)
    for setter in (library.TIFFSetWarningHandler, library.TIFFSetErrorHandler):
        setter.restype = ctypes.c_void_p
        setter.argtypes = [_TIFF_HANDLER]
        setter(callback)


def _libtiff() -> ctypes.CDLL | None:
    """The libtiff that Pillow's decoder is linked with, as already loaded into this process."""
    from PIL import features

    if not features.check("libtiff"):
        return None
    from PIL import _imaging  # noqa: F401  (loads libtiff into the process)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libtiff" in line and "/" in line}
    except OSError:  # not Linux: messages keep going to stderr
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None
