"""Decoding in a pool of worker processes, so that what an image costs is bounded by construction.

Pillow, libjpeg, libpng, libtiff and libwebp have more ways to spend memory and time on crafted
bytes than any list of checks could name (a 64x64 TIFF whose one tile is 16384x16384; millions of
empty JPEG segments). So the server's process never parses image bytes: each image goes to a worker
process (serving.engine.decode_worker) that runs under its own address-space limit, and the worker is
killed, and replaced, the moment the call's deadline passes, its caller leaves, the decode runs past
`timeout_s` of CPU time, or the server stops. Any image then costs at most one worker's
`memory_bytes` for at most the call's deadline and `timeout_s` of CPU, and the pool's size caps how many such
images are decoded at once, whatever the callers send. Chromium's and ImageMagick's policies for
untrusted images work the same way.

Workers are forked from a zygote process that imported the decoders and nothing else (see
serving.engine.decode_worker): starting one costs milliseconds and never forks the server's own threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from serving.bundle.preprocess import ImageError
from serving.engine import decode_worker
from serving.engine.decode_worker import Decoded, Job, Refused
from serving.engine.errors import ItemFailed

log = logging.getLogger("serving")

# How often a call waiting on its worker looks whether its deadline passed or its caller left, seconds:
# the longest a decode outlives a caller who gave up.
POLL_S = 0.02
# A worker that has not said it is ready after this long is taken for broken (a memory limit too low to
# start in, for instance), seconds.
START_TIMEOUT_S = 30.0


class DecoderStartError(RuntimeError):
    """The decode workers cannot start: the message says why and which setting to change."""


class _Zygote:
    """The process workers are forked from (serving.engine.decode_worker's zygote_main)."""

    def __init__(self, memory_bytes: int):
        ours, theirs = socket.socketpair()
        # One thread each for the numeric libraries: a worker decodes one image at a time, and threads
        # it never uses would still reserve address space under its limit.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.engine.decode_worker", str(theirs.fileno()), str(memory_bytes)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        self.sock = ours
        self._lock = threading.Lock()

    def spawn(self) -> tuple[int, Connection]:
        """A new worker's pid and the server's end of its pipe."""
        with self._lock:
            try:
                self.sock.sendall(decode_worker.SPAWN)
                message, fds, _, _ = socket.recv_fds(self.sock, decode_worker.PID.size, 1)
            except OSError as e:
                raise DecoderStartError(f"the decode workers' zygote process is not answering: {e}") from None
        if len(message) != decode_worker.PID.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise DecoderStartError(
                f"the decode workers' zygote process ended (exit code {self.process.poll()}); see the log above"
            )
        (pid,) = decode_worker.PID.unpack(message)
        return pid, Connection(fds[0])

    def close(self) -> None:
        self.sock.close()  # the zygote exits when it reads the end of its socket
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Worker:
    def __init__(self, pid: int, conn: Connection):
        self.pid = pid
        self.conn = conn

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone (and reaped by the zygote)
            os.kill(self.pid, signal.SIGKILL)
        self.conn.close()


class DecodePool:
    """`workers` decode processes, each limited to `memory_bytes` of address space; `decode` sends one
    image to an idle one and waits for its views. Started workers are replaced as they die or are killed.

    `on_replaced(reason)` is told each time a worker is killed or found dead ("deadline", "cancelled",
    "timeout", "memory", "crash"), and `on_warnings(counts)` of the decoders' complaints about each image
    that had any (by source: serving.engine.decoder_log), for the server's metrics."""

    def __init__(
        self,
        workers: int,
        memory_bytes: int,
        *,
        timeout_s: float,
        on_replaced: Callable[[str], None] = lambda reason: None,
        on_warnings: Callable[[dict[str, int]], None] = lambda counts: None,
    ):
        if workers < 1:
            raise ValueError("the decode pool needs at least one worker")
        self.memory_bytes = memory_bytes
        self.timeout_s = timeout_s
        self.on_replaced = on_replaced
        self.on_warnings = on_warnings
        self._zygote = _Zygote(memory_bytes)
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False
        self._wanted = 0  # workers to start, asked of the spawner thread
        for _ in range(workers):
            self._idle.append(self._start())
        self._spawner = threading.Thread(target=self._spawn_loop, name="decode-spawner", daemon=True)
        self._spawner.start()

    # The call side.

    def decode(self, job: Job, data: bytes, check: Callable[[], None]) -> Decoded:
        """The views of the image in `data`, as `job` says. Raises ImageError (the bytes are not a
        usable image), ItemFailed (the image needs more than a worker's memory or time, or crashed
        its decoder), or whatever `check` raises: it is called every POLL_S seconds while waiting,
        to end the wait when the call's deadline passed or its caller left, and the worker with it."""
        worker = self._acquire(check)
        outcome = "crash"
        try:
            worker.conn.send(job)
            worker.conn.send_bytes(data)
            self._wait(worker, check)
            reply = worker.conn.recv()
            # After running out of memory a worker's heap may be fragmented: a fresh one replaces it.
            outcome = "memory" if isinstance(reply, Refused) and reply.kind == "memory" else "ok"
        except _Abandoned as e:
            outcome = e.reason
            raise e.error from None
        except (EOFError, OSError):
            if self._closed:
                raise _shutting_down() from None
            raise ItemFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the image decoder crashed on this image; the server is unharmed, "
                "but the image cannot be used: re-encode it as PNG or JPEG",
            ) from None
        finally:
            self._release(worker, outcome)
        return self._result(reply)

    def _wait(self, worker: _Worker, check: Callable[[], None]) -> None:
        # The time limit counts the worker's CPU time, not the clock's: on a machine loaded by other
        # work an ordinary image may take long to come back, but it does not take long to decode.
        start = cpu_seconds(worker.pid)
        while not worker.conn.poll(POLL_S):
            try:
                check()
            except Exception as e:
                # The call is over; so is its image's decode, whatever state the worker is in.
                raise _Abandoned(e, _reason(e)) from None
            if cpu_seconds(worker.pid) - start >= self.timeout_s:
                raise _Abandoned(
                    ItemFailed(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"decoding this image took more than {self.timeout_s:g} s of CPU time (--decode-timeout-s); "
                        "send a plainer or smaller file",
                    ),
                    "timeout",
                )

    def _result(self, reply: Decoded | Refused) -> Decoded:
        if reply.warnings:
            self.on_warnings(reply.warnings)
        if isinstance(reply, Decoded):
            return reply
        if reply.kind == "image":
            raise ImageError(reply.message)
        if reply.kind == "memory":
            raise ItemFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"decoding this image needs more than the {self.memory_bytes / 2**20:.0f} MiB a decoder may use "
                "(--decode-worker-memory-mb); send a smaller image (the same one always fails)",
            )
        log.error("a decoder failed on an image: %s", reply.message)
        raise ItemFailed(grpc.StatusCode.INTERNAL, f"the server failed to decode this image: {reply.message}")

    # The pool's workers.

    def _acquire(self, check: Callable[[], None]) -> _Worker:
        with self._cond:
            return self._acquire_locked(check)

    def _acquire_locked(self, check: Callable[[], None]) -> _Worker:
        while True:
            while not self._idle:
                if self._closed:
                    raise _shutting_down()
                check()
                self._cond.wait(POLL_S)
            worker = self._idle.pop()
            if not worker.conn.poll(0):
                self._busy.add(worker)
                return worker
            # An idle worker has nothing to say: it died (the kernel's OOM killer, say). Replace it
            # rather than blame the next image for it.
            self._wanted += 1
            self._cond.notify_all()
            worker.kill()
            self.on_replaced("crash")

    def _release(self, worker: _Worker, outcome: str) -> None:
        with self._cond:
            self._busy.discard(worker)
            if outcome == "ok" and not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
            if not self._closed:
                self._wanted += 1
                self._cond.notify_all()
        worker.kill()
        if outcome != "ok":
            self.on_replaced(outcome)

    def _start(self) -> _Worker:
        pid, conn = self._zygote.spawn()
        worker = _Worker(pid, conn)
        try:
            if not conn.poll(START_TIMEOUT_S):
                raise DecoderStartError(f"a decode worker did not start within {START_TIMEOUT_S:g} s")
            ready = conn.recv()
        except (EOFError, OSError):
            worker.kill()
            raise DecoderStartError(
                f"a decode worker could not start under its memory limit of {self.memory_bytes / 2**20:.0f} MiB; "
                "raise --decode-worker-memory-mb"
            ) from None
        except DecoderStartError:
            worker.kill()
            raise
        assert ready == decode_worker.READY, ready
        return worker

    def _spawn_loop(self) -> None:
        while True:
            with self._cond:
                while self._wanted == 0 and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._wanted -= 1
            try:
                worker = self._start()
            except DecoderStartError as e:  # fork failed under memory pressure: try again shortly
                log.error("replacing a decode worker failed: %s", e)
                with self._cond:
                    self._wanted += 1
                time.sleep(1.0)
                continue
            with self._cond:
                if self._closed:
                    worker.kill()
                    return
                self._idle.append(worker)
                self._cond.notify()

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (for measuring their memory)."""
        with self._cond:
            return [w.pid for w in [*self._idle, *self._busy]]

    @property
    def zygote_pid(self) -> int:
        return self._zygote.process.pid

    def close(self) -> None:
        """Kill every worker, idle or busy: calls still decoding fail at once."""
        with self._cond:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle.clear()
            self._cond.notify_all()
        for w in workers:
            w.kill()
        self._spawner.join(START_TIMEOUT_S)
        self._zygote.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Abandoned(Exception):
    """The call stopped waiting for its worker (`error` says why); the worker must go."""

    def __init__(self, error: Exception, reason: str):
        super().__init__(str(error))
        self.error = error
        self.reason = reason


_TICKS = os.sysconf("SC_CLK_TCK")
_started = time.monotonic()


def cpu_seconds(pid: int) -> float:
    """CPU time process `pid` has used, user and system, seconds (its wall-clock age where /proc has
    no such process: not Linux, or it has just ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return time.monotonic() - _started
    # Fields after the command name, which is in parentheses and may hold spaces: state is field 3,
    # utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _shutting_down() -> ItemFailed:
    return ItemFailed(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")


def _reason(error: Exception) -> str:
    code = getattr(error, "code", None)
    return "deadline" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "cancelled"
