"""DALI decodes in a child process: a crash in a native decoder costs one verdict, not the run.

A segfault or abort inside DALI (the decoder meeting a hostile stream, or ``Pipeline.build`` itself: one clean-clone
test run died there, see below) ends the process it happens in. So every decode the bad-image screen and ``fastclr
data check`` make runs in one long-lived child per parent process, started on first use. The child imports DALI once
and keeps its pipelines across calls; encoded bytes go to it over a socket, verdicts (and pixels, when asked) come
back. If the child dies during a call, the parent reaps it, starts a fresh one for the next call, and the image's
verdict is "decoder crashed (SIGSEGV)"; a batch that crashed is decoded again image by image to find the culprit.

How the child starts. A fresh interpreter (fork + exec, as multiprocessing's ``spawn`` does; never a bare fork of a
process whose DALI or torch threads may hold a lock) that runs this file by path. Not multiprocessing's ``spawn``
context itself: that re-runs the parent's main script in the child, which fails for a script without the
``if __name__ == "__main__"`` guard or read from stdin, and for ``launchers/pretrain.py`` imports torch and the trainer
into every rank's decoder. Not ``import fastclr.data.decoder`` either: the package ``fastclr.data`` imports torch,
2.1 s and 300 MB here against 0.45 s and 100 MB for DALI alone. The child gets the parent's ``sys.path`` and working
directory, and exits when the parent closes the socket, exits or dies.

Fault injection. The child decodes with :func:`dali_decode` unless told to use another function with the same
signature, named ``"module:function"`` (importable in the child): :data:`DECODE_FN` in the parent, read when a child
starts, or else the environment variable ``FASTCLR_DECODE_FN`` (inherited by the child; set it for a run started as a
subprocess). Tests use it to kill the child with SIGSEGV on a marker.

Why the in-process build crashed (DALI 2.4, CPU; suspected, not proven). The screen used to build its one-image
pipeline on whichever thread met a suspect file, usually the loader's read-ahead thread. That thread outlives its
loader (after the last batch it still reads, and screens, the next one), so it can build during a later test while the
main thread builds, runs or frees other pipelines: ``data check``'s batch pipeline shared no lock with the screen, and
a loader's pipeline sits in a reference cycle (pipeline -> callback -> loader), so the cyclic GC frees it on whatever
thread triggers a collection, possibly inside another ``build``. Running the old tests/data/test_bad_files.py 57 times
here segfaulted once (rc 139, under load from another job); 5 minutes of three threads building, running and
GC-freeing pipelines did not. Now the training process builds no screen pipeline, and in the child one lock
serialises every DALI call (:func:`dali_decode`), so no two builds overlap.
"""
from __future__ import annotations

import atexit
import importlib
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback

import numpy as np

DECODE_FN: str | None = None
"""``"module:function"`` the next child decodes with instead of :func:`dali_decode` (fault injection for tests)."""
DECODE_FN_ENV = "FASTCLR_DECODE_FN"
"""Environment variable the child reads when :data:`DECODE_FN` is None; same format."""
TIMEOUT_S = 120.0
"""Longest wait for one answer or for the child to start (~0.5 s here; 64 CIFAR JPEGs decode in ~10 ms): a child that
takes longer is taken for hung, killed, and the images it held judged bad."""
_CHILD_RUN_NAME = "__fastclr_decoder_child__"
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name=sys.argv[2])"


# ------------------------------------------------------------------------------------------------------------------ #
# The child side: the real decode.

_dali_lock = threading.Lock()
_pipes: dict[tuple, tuple[object, int]] = {}  # (device_id, threads) -> (pipeline, its max batch size)


def _decoder_message(text: str) -> str:
    """The decoder's own words from a DALI pipeline error (which also carries a traceback of the graph)."""
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    text = text.split("Current pipeline object", 1)[0]
    return " ".join(text.split())[:200] or "decoder error"


def _pipeline(device_id: int | None, threads: int, size: int):
    """A decode pipeline for up to ``size`` images, reused while large enough: external_source takes any batch up to
    the size it was built for."""
    key = (device_id, threads)
    pipe, built_for = _pipes.get(key, (None, 0))
    if pipe is None or built_for < size:
        from nvidia.dali import fn, pipeline_def, types

        device = "cpu" if device_id is None else "mixed"

        @pipeline_def(batch_size=size, num_threads=threads, device_id=device_id, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def decode():
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(data, device=device, output_type=types.RGB)

        _pipes.pop(key, None)  # drop the old one before the new one builds: one live pipeline per key
        pipe = decode()
        pipe.build()
        _pipes[key] = (pipe, size)
    return pipe


def _run(bufs: list[np.ndarray], device_id: int | None, threads: int, pixels: bool) -> list:
    pipe = _pipeline(device_id, threads, len(bufs))
    try:
        pipe.feed_input("encoded", bufs)
        (out,) = pipe.run()
    except Exception:
        _pipes.pop((device_id, threads), None)  # a failed run leaves the pipeline unusable: rebuild next time
        raise
    if device_id is not None:
        out = out.as_cpu()
    results = []
    for k, shape in enumerate(out.shape()):
        if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 1:
            results.append((None, f"decoded to an unusable shape {tuple(shape)}"))
        else:
            results.append((np.array(out.at(k)) if pixels else None, None))
    return results


def dali_decode(bufs: list[np.ndarray], device_id: int | None = None, threads: int = 1,
                pixels: bool = False) -> list[tuple[np.ndarray | None, str | None]]:
    """DALI's verdict on each encoded image of ``bufs``: ``(HWC uint8 RGB pixels or None, None)`` if it decodes to a
    non-empty RGB image (pixels only when ``pixels``), else ``(None, why not)``. ``device_id=None``: the CPU
    decoder; a GPU index: the ``mixed`` (nvJPEG) decoder training uses on that GPU. One batch on ``threads`` threads;
    where the batch fails (DALI fails it as a whole) the images are decoded one by one to tell which are bad.

    Every DALI call holds one lock: no two pipeline builds or runs overlap in this process."""
    if not bufs:
        return []
    bufs = [np.ascontiguousarray(b, np.uint8) for b in bufs]
    with _dali_lock:
        try:
            return _run(bufs, device_id, threads, pixels)
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses with the decoder's message
            if len(bufs) == 1:
                return [(None, f"not decodable ({_decoder_message(str(e))})")]
    return [dali_decode([b], device_id, 1, pixels)[0] for b in bufs]  # the lock is released: it is not reentrant


def _resolve(spec: str):
    """The function a ``"module:function"`` spec names; an error that quotes the spec where it does not."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"decode function {spec!r} ({DECODE_FN_ENV} or decoder.DECODE_FN): not importable as "
                         f"'module:function' in the decoder process ({e})") from e


# ------------------------------------------------------------------------------------------------------------------ #
# The wire: length-prefixed pickles over a socket pair.

def _send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("<Q", len(data)))
    sock.sendall(data)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the other end closed the connection")
        got += k
    return buf


def _recv(sock: socket.socket):
    (n,) = struct.unpack("<Q", _recv_exactly(sock, 8))
    return pickle.loads(_recv_exactly(sock, n))


def _serve(sock: socket.socket, parent_pid: int) -> None:
    """The child's loop: take the parent's set-up, say ready (or why not), then answer ``(bufs, device_id, threads,
    pixels)`` requests until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes the socket
    try:
        setup = _recv(sock)
        sys.path[:] = setup["sys_path"]
        spec = setup["decode_fn"] or os.environ.get(DECODE_FN_ENV) or None
        importlib.import_module("nvidia.dali")  # fail here, as a start-up error, not on the first image
        decode = _resolve(spec) if spec else dali_decode
        _send(sock, ("ready", None))
    except EOFError:
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send(sock, ("failed", f"{type(e).__name__}: {e}"))
        return
    while True:
        # Wait in slices so that a parent killed outright is noticed even if a process it forked holds its end of
        # the socket open: the child is then re-parented.
        while not select.select([sock], [], [], 1.0)[0]:
            if os.getppid() != parent_pid:
                return
        try:
            bufs, device_id, threads, pixels = _recv(sock)
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", decode(bufs, device_id=device_id, threads=threads, pixels=pixels))
        except Exception:  # noqa: BLE001 - a bug in the decode function is the parent's error to raise
            reply = ("error", traceback.format_exc(limit=4))
        try:
            _send(sock, reply)
        except OSError:
            return


# ------------------------------------------------------------------------------------------------------------------ #
# The parent side.

class DecoderCrashed(Exception):
    """The child died (or hung) while answering; ``reason`` is the verdict for the image(s) it was decoding."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecoderProcess:
    """The parent's handle on the decode child: started on first use, restarted after a crash, closed at exit.

    Thread-safe: one lock covers a request and its answer (the loader screens on its read-ahead thread while the
    main thread may blame a failed batch)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._owner = None  # pid of the process that started the child
        self._atexit = False

    @property
    def pid(self) -> int | None:
        """The child's process id; None before the first use and after a crash until the next call."""
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        """Start a child and wait until it has imported DALI and the decode function. A child that cannot start is
        an error (RuntimeError), not a verdict: no image is to blame."""
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, os.path.abspath(__file__), _CHILD_RUN_NAME, str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()  # else this process holds the child's end open and never sees EOF when the child dies
        self._proc, self._sock, self._owner = proc, ours, os.getpid()
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True
        status = detail = None
        ours.settimeout(TIMEOUT_S)
        try:
            _send(ours, {"sys_path": list(sys.path), "decode_fn": DECODE_FN})
            status, detail = _recv(ours)
        except (EOFError, OSError) as e:  # closed, broken or timed out (TimeoutError is an OSError)
            detail = None if isinstance(e, EOFError) else f"no start-up answer ({e})"
        except BaseException:  # interrupted (KeyboardInterrupt): an unread "ready" would answer the next request
            proc.kill()
            self._reap()
            raise
        if status != "ready":
            what = self._reap()
            raise RuntimeError(f"the decoder process (fastclr.data.decoder) did not start: "
                               f"{detail or what + '; its error is printed above'}")

    def _reap(self) -> str:
        """Wait for the child, killing it if it is still alive (hung); what happened to it, as a verdict."""
        proc, self._proc = self._proc, None
        self._sock.close()
        self._sock = None
        try:
            proc.wait(5.0)  # it died: its end of the socket closed a moment before it is reapable
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"decoder hung (no answer in {TIMEOUT_S:.0f} s)"
        code = proc.returncode
        if code < 0 and -code in signal.valid_signals():
            return f"decoder crashed ({signal.Signals(-code).name})"
        return f"decoder crashed (exit status {code})"

    def request(self, bufs: list, device_id: int | None, threads: int, pixels: bool) -> list:
        """One round trip; :class:`DecoderCrashed` if the child died (it is reaped; the next call starts another)."""
        with self._lock:
            if self._proc is not None and self._owner != os.getpid():
                self._sock.close()  # a fork of the parent: that child is not ours to talk to
                self._proc = self._sock = None
            if self._proc is not None and self._proc.poll() is not None:
                self._reap()  # died between calls (killed from outside): not this request's doing
            if self._proc is None:
                self._start()
            try:
                _send(self._sock, (bufs, device_id, threads, pixels))
                status, payload = _recv(self._sock)
            except (EOFError, OSError):  # it died (its end of the socket closed), or timed out
                raise DecoderCrashed(self._reap()) from None
            except BaseException:  # interrupted half-way (KeyboardInterrupt): the replies would be out of step
                self._proc.kill()
                self._reap()
                raise
        if status == "error":
            raise RuntimeError(f"decoder process: {payload}")
        return payload

    def decode(self, bufs: list, *, device_id: int | None = None, threads: int = 1,
               pixels: bool = False) -> list[tuple[np.ndarray | None, str | None]]:
        """:func:`dali_decode` of ``bufs`` in the child. A batch that crashes it is decoded again image by image, in
        a fresh child each time one crashes: the culprit's verdict is the crash, the others get their own."""
        bufs = [b if isinstance(b, np.ndarray) else np.frombuffer(b, np.uint8) for b in bufs]
        try:
            return self.request(bufs, device_id, threads, pixels)
        except DecoderCrashed as crash:
            if len(bufs) == 1:
                return [(None, crash.reason)]
        return [self.decode([b], device_id=device_id, pixels=pixels)[0] for b in bufs]

    def close(self) -> None:
        """End the child (it sees the socket close and exits) and reap it; a later call starts a new one."""
        with self._lock:
            if self._proc is None or self._owner != os.getpid():
                return
            proc, self._proc = self._proc, None
            self._sock.close()
            self._sock = None
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_process = DecoderProcess()


def decode(bufs: list, *, device_id: int | None = None, threads: int = 1,
           pixels: bool = False) -> list[tuple[np.ndarray | None, str | None]]:
    """:meth:`DecoderProcess.decode` in this process's decoder child (the one the screen and the check share)."""
    return _process.decode(bufs, device_id=device_id, threads=threads, pixels=pixels)


def child_pid() -> int | None:
    """The current decoder child's process id (None if none is running)."""
    return _process.pid


def restart() -> None:
    """End the decoder child; the next decode starts a fresh one (and reads :data:`DECODE_FN` again)."""
    _process.close()


if __name__ == _CHILD_RUN_NAME:  # the child: DecoderProcess._start runs this file through runpy.run_path
    _serve(socket.socket(fileno=int(sys.argv[3])), int(sys.argv[4]))
