"""The child side of serving.engine.decoders: a process that turns encoded image bytes into a call's TTA
views, one image at a time, under a memory limit it cannot exceed.

It runs the same `serving.bundle.preprocess.load_views` the trainer runs in-process, so served views equal
trained and evaluated ones. Everything an image can make a decoder do happens here: a parser bug, a
tile that claims gigabytes, a flood of empty chunks. The server's process only sends bytes and
reads back uint8 arrays; it kills this one when the call's deadline passes or its caller leaves.

Workers are forked by a zygote (`python -m serving.engine.decode_worker MEMORY_BYTES`, started once per
pool): a single-threaded process that imported the decoders and nothing else (no grpc, no
onnxruntime), so that starting a replacement worker costs a few milliseconds and never forks the
server's own threads. multiprocessing's forkserver would too, but re-imports the parent's main
module in every worker (the server's CLI, with grpc and onnxruntime).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import struct
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from serving.bundle.manifest import Preprocessing, TTAView
from serving.bundle.preprocess import ImageError, load_views
from serving.engine import decoder_log

# prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills a worker when its zygote dies, which it does as soon
# as the server's end of its socket closes, even when the server was SIGKILLed: so no decoder outlives
# its server in the middle of a hostile image.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Job:
    """One image to decode: the bundle's preprocessing and the views the call asked for, and the
    pixel limits that apply (the image's own, and what is left of the call's). Its bytes travel
    beside it, unpickled, so that a 20 MB file is not copied once more on its way."""

    preprocessing: Preprocessing
    views: Sequence[TTAView]
    formats: Sequence[str]
    max_pixels: int  # one image, width x height
    call_pixels: int  # decoded by earlier images of the same call
    max_call_pixels: int


@dataclass(frozen=True)
class Decoded:
    views: np.ndarray  # uint8 (n_views, size, size, 3)
    pixels: int  # width x height of the decoded image
    warnings: dict[str, int]  # Pillow's and libtiff's complaints, by source (serving.engine.decoder_log)


@dataclass(frozen=True)
class Refused:
    """Why an image could not be decoded. kind: "image" (the bytes are not a usable image), "memory"
    (decoding needs more than the worker's limit) or "bug" (a decoder raised what it should not)."""

    kind: str
    message: str
    warnings: dict[str, int]


READY = "ready"
# The zygote's answer to a request for a worker: the worker's pid, with its end of the pipe attached.
PID = struct.Struct("<i")
SPAWN = b"s"


def call_pixels_admit(job: Job, seen: list[int]):
    """load_views' admit hook: refuse an image that would take its call past `max_call_pixels`;
    the image's pixel count (from its header) is appended to `seen`."""

    @contextmanager
    def admit(pixels: int) -> Iterator[None]:
        seen.append(pixels)
        total = job.call_pixels + pixels
        if total > job.max_call_pixels:
            raise ImageError(
                f"this image's {pixels} pixels would bring the call's total to {total}, over the limit of "
                f"{job.max_call_pixels} pixels per call; send it in another call"
            )
        yield

    return admit


def decode(job: Job, data: bytes) -> Decoded | Refused:
    """The job's views, or why not. Never raises for anything the bytes can cause."""
    warnings: Counter[str] = Counter()
    pixels: list[int] = []
    try:
        with decoder_log.counted(lambda source: warnings.update([source])):
            views = load_views(
                data,
                job.preprocessing,
                job.views,
                max_pixels=job.max_pixels,
                formats=job.formats,
                admit=call_pixels_admit(job, pixels),
            )
        return Decoded(views, pixels[0], dict(warnings))
    except ImageError as e:
        return Refused("image", str(e), dict(warnings))
    except MemoryError:
        return Refused("memory", "", dict(warnings))
    except Exception as e:  # a decoder bug on this input: it fails this image only
        return Refused("bug", f"{type(e).__name__}: {e}", dict(warnings))


def worker_main(conn: Connection, memory_bytes: int) -> None:
    """The worker's loop: limit its own memory, say it is ready, then decode until the pipe closes."""
    _die_with_parent()
    # SIGINT goes to the whole process group on Ctrl-C; the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Address space, not resident memory: a limit the kernel enforces on every allocation, so that no
    # parser can take more whatever the image claims. PSS <= RSS <= address space.
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    conn.send(READY)
    while True:
        try:
            job = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the server closed the pipe: it is stopping or replaced us
            return
        try:
            conn.send(decode(job, data))
        except MemoryError:  # the reply itself did not fit: report it small
            conn.send(Refused("memory", "", {}))


def _die_with_parent() -> None:
    # Not on Linux: no prctl, and the closed pipe still ends an idle worker.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def zygote_main(control: socket.socket, memory_bytes: int) -> None:
    """Fork one worker per byte received on `control`, and send back its pid with the server's end of
    its pipe; exit when the server closes `control` (it stopped, or died). Not _die_with_parent():
    that signal comes when the *thread* that started a process ends, and a pool may be made by a
    thread that ends before the server does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Workers are reaped by the kernel as they exit: the server kills them by pid and needs no status.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # Every decoder plugin imported and the log routes laid once, here, instead of in each worker.
    decoder_log.install()
    while control.recv(1) == SPAWN:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            control.close()
            ours.close()
            code = 0
            try:
                worker_main(Connection(theirs.detach()), memory_bytes)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        socket.send_fds(control, [PID.pack(pid)], [ours.fileno()])
        ours.close()


if __name__ == "__main__":
    # Through the module's own name, so that what workers send pickles as serving.engine.decode_worker's classes.
    from serving.engine import decode_worker

    decode_worker.zygote_main(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]))
