"""Shared memory between a replica and the parameter shards on its own host.

Over distributed's TCP, a fetch and a push between two processes of one machine each cost the
sending and the receiving process about 0.7 CPU seconds per GB (serialising, loopback socket,
reading back) on the very cores the replicas compute on; on a 2-core machine each of Downpour's
two processes had its event loop busy a third of the time. Between processes of one host nothing
needs to move:

* a shard keeps its parameters in a segment (``Segment``: an anonymous memory file,
  ``memfd_create``) that replicas on its host map; a fetch is one copy out of it, under a lock
  the shard holds while it writes them (``flock``, so a fetch never sees half an update);
* a replica's push buffers are segments too (``empty``): a push names the buffer (``Ref``)
  instead of carrying it, and the shard applies the gradient straight from there. The replica
  reuses a buffer only after the shard acknowledged the push that named it (``ps.pushes``).
* the push itself travels through a pipe (``Mailbox``) and runs on the shard's actor thread,
  one method at a time as an actor call does; the answer comes back through a pipe of the
  replica's process (``Answers``). An actor call's message costs both event loops a
  millisecond or more of CPU each way; a pipe costs microseconds.

A shard's updates, versions and counters are what they are over TCP. A push to a shard whose
process is gone fails on the pipe (``BrokenPipeError``); one sent as it dies is never answered,
and the caller's wait gives up as for an actor call. A segment is found through
``/proc/<pid>/fd/<fd>`` of its owner and checked against a random token, so a process that
cannot open it (another host with the same address, another PID namespace, not Linux) uses TCP
as before. A segment lives while any process maps it: a killed process leaves nothing behind in
a filesystem.
``daskbelief.shared-memory: false`` (dask config) turns it all off.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import itertools
import mmap
import os
import pickle
import secrets
import select
import struct
import threading
import weakref
from dataclasses import dataclass, replace

import dask.config
import numpy as np
from distributed.comm.addressing import get_address_host

HEADER = 8  # int64 slots before the values: token, version, fetches, bytes fetched
TOKEN, VERSION, FETCHES, BYTES_OUT = range(4)
ATTACHED = 16  # replicas' push buffers a shard keeps mapped (the least recently used goes first)


def enabled() -> bool:
    """Whether processes of one host share memory (Linux, and not turned off in dask's config)."""
    return hasattr(os, "memfd_create") and bool(dask.config.get("daskbelief.shared-memory", True))


def reopen(pid: int, fd: int, flags: int) -> int:
    """A new descriptor of what process ``pid`` holds as ``fd`` (a memory file, a pipe):
    how processes of one host reach each other's segments and pipes. ``OSError`` when this
    process may not (another PID namespace, no such process or descriptor)."""
    return os.open(f"/proc/{pid}/fd/{fd}", flags | os.O_CLOEXEC)


@dataclass(frozen=True)
class Ref:
    """Where ``length`` float32 values lie: ``offset`` values into segment ``(pid, fd, token)``."""
    pid: int
    fd: int
    token: int
    size: int  # float32 values in the whole segment
    offset: int = 0
    length: int | None = None
    mail: int | None = None  # the owner's fd of the write end of its ``Mailbox``

    def part(self, offset: int, length: int) -> "Ref":
        return replace(self, offset=offset, length=length)


class Segment:
    """``size`` float32 values behind a header, in a memory file other processes of this host
    can map. The creator owns it (``create``); others map it through its ``Ref`` (``attach``)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self._map = mmap.mmap(fd, 8 * HEADER + 4 * size)
        self._closer = weakref.finalize(self, os.close, fd)  # the mapping goes with its arrays
        self.header = np.frombuffer(self._map, np.int64, HEADER)
        self.values = np.frombuffer(self._map, np.float32, size, 8 * HEADER)

    @classmethod
    def create(cls, size: int) -> "Segment":
        fd = os.memfd_create("daskbelief", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 8 * HEADER + 4 * size)
            segment = cls(fd, size)
        except BaseException:
            os.close(fd)
            raise
        segment.header[TOKEN] = secrets.randbits(62) + 1
        segment.ref = Ref(os.getpid(), fd, int(segment.header[TOKEN]), size)
        return segment

    @classmethod
    def attach(cls, ref: Ref) -> "Segment":
        """Map the segment ``ref`` names; ``OSError`` when this process cannot (another host,
        another PID namespace, its owner gone) or finds another segment there."""
        fd = reopen(ref.pid, ref.fd, os.O_RDWR)
        wrong = OSError(f"/proc/{ref.pid}/fd/{ref.fd} is not the segment asked for")
        try:
            if os.fstat(fd).st_size != 8 * HEADER + 4 * ref.size:
                raise wrong
            segment = cls(fd, ref.size)
        except BaseException:
            os.close(fd)
            raise
        if int(segment.header[TOKEN]) != ref.token:
            segment.close()
            raise wrong
        segment.ref = ref
        return segment

    @contextlib.contextmanager
    def locked(self):
        """Hold the segment's lock: its writer while it changes the values, a reader while it
        copies them (an exclusive ``flock``; the kernel drops it with a killed holder)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def view(self, ref: Ref) -> np.ndarray:
        """The values ``ref`` names in this segment."""
        length = self.size - ref.offset if ref.length is None else ref.length
        return self.values[ref.offset:ref.offset + length]

    def close(self) -> None:
        """Unmap now (no array on the segment may be used after) and close its file."""
        del self.header, self.values
        with contextlib.suppress(BufferError):  # an array still on it: unmapped when it goes
            self._map.close()
        self._closer()


# -- a replica's push buffers -----------------------------------------------------------------------
_buffers: dict[int, tuple[int, Ref]] = {}  # data address -> (end address, segment) of live buffers


def empty(size: int, dtype=np.float32) -> np.ndarray:
    """An uninitialised float32 buffer that shards on this host can read where it lies
    (``ref_of``); a plain array when shared memory is off or for other dtypes."""
    if not enabled() or np.dtype(dtype) != np.float32:
        return np.empty(size, dtype)
    segment = Segment.create(size)
    segment._closer.detach()  # the buffer, not the segment object, keeps the file open
    buf, start = segment.values, segment.values.ctypes.data
    _buffers[start] = (start + buf.nbytes, segment.ref)
    weakref.finalize(buf, _forget, start, segment.fd)
    return buf


def _forget(start: int, fd: int) -> None:
    _buffers.pop(start, None)
    os.close(fd)  # the mapping goes with the last array on it


def ref_of(values: np.ndarray) -> Ref | None:
    """The ``Ref`` of ``values`` when they lie in one of this process's buffers (``empty``)."""
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or not values.flags.c_contiguous:
        return None
    at = values.ctypes.data
    for start, (end, ref) in list(_buffers.items()):  # a finalizer may drop one meanwhile
        if start <= at and at + values.nbytes <= end:
            return ref.part((at - start) // 4, len(values))
    return None


class Attached:
    """The push buffers a shard has mapped, the most recently used kept (``ATTACHED`` at most)."""

    def __init__(self, limit: int = ATTACHED):
        self.limit = limit
        self.segments: collections.OrderedDict = collections.OrderedDict()

    def view(self, ref: Ref) -> np.ndarray:
        key = (ref.pid, ref.fd, ref.token)
        segment = self.segments.pop(key, None) or Segment.attach(ref)
        self.segments[key] = segment
        while len(self.segments) > self.limit:
            self.segments.popitem(last=False)[1].close()
        return segment.view(ref)


# -- pushes through pipes ---------------------------------------------------------------------------
LENGTH = struct.Struct("<I")


def send(fd: int, message) -> None:
    """Write ``message`` (pickled) to pipe ``fd`` in one write of at most ``PIPE_BUF`` bytes,
    which the kernel never interleaves with another process's or thread's."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if LENGTH.size + len(data) > select.PIPE_BUF:
        raise ValueError(f"a message of {len(data)} bytes does not fit one pipe write")
    os.write(fd, LENGTH.pack(len(data)) + data)


def messages(fd: int):
    """The messages read from pipe ``fd``, until every writer has closed it."""
    pending = b""
    while chunk := os.read(fd, 1 << 16):
        pending += chunk
        while len(pending) >= LENGTH.size:
            (n,) = LENGTH.unpack_from(pending)
            if len(pending) < LENGTH.size + n:
                break
            yield pickle.loads(pending[LENGTH.size:LENGTH.size + n])
            pending = pending[LENGTH.size + n:]


class Mailbox:
    """A shard's pipe for pushes from replicas of its host: a thread reads them and runs each on
    the shard's actor thread (``executor``), then writes the answer to the pipe the replica
    named. It holds ``push`` weakly, so the shard is freed as usual; ``close`` stops it."""

    def __init__(self, push, executor):
        self._read, self.fd = os.pipe()
        self._answers: dict[tuple[int, int], int] = {}  # (pid, fd) -> our fd of that pipe
        threading.Thread(target=self._serve, args=(weakref.WeakMethod(push), executor),
                         name="daskbelief-mailbox", daemon=True).start()

    def _serve(self, push, executor) -> None:
        try:
            for message in messages(self._read):
                method = push()
                if message is None or method is None:
                    break
                to, call, args = message
                executor.submit(method, *args).add_done_callback(
                    lambda done, to=to, call=call: self._answer(to, call, done))
                del method
        finally:
            os.close(self._read)

    def _answer(self, to: tuple[int, int], call: int, done) -> None:
        error = done.exception()
        answer = (call, None, f"{type(error).__name__}: {error}") if error else (call, done.result(), None)
        try:
            if to not in self._answers:
                self._answers[to] = reopen(*to, os.O_WRONLY)
            send(self._answers[to], answer)
        except OSError:  # the replica's process is gone: nobody waits for this answer
            self._answers.pop(to, None)

    def close(self) -> None:
        send(self.fd, None)
        os.close(self.fd)
        for fd in self._answers.values():
            with contextlib.suppress(OSError):
                os.close(fd)


class ShardError(RuntimeError):
    """A push through a pipe failed on the shard (the message is the shard's error)."""


class Answers:
    """This process's pipe for shards' answers, and the pushes that await them."""

    def __init__(self):
        self.pid = os.getpid()
        self._read, self.fd = os.pipe()
        self._calls = itertools.count()
        self._lock = threading.Lock()
        self._waiting: dict[int, concurrent.futures.Future] = {}
        threading.Thread(target=self._serve, name="daskbelief-answers", daemon=True).start()

    def expect(self) -> tuple[int, concurrent.futures.Future]:
        """A new call number and the future its answer will complete."""
        future = concurrent.futures.Future()
        with self._lock:
            call = next(self._calls)
            self._waiting[call] = future
        return call, future

    def forget(self, call: int) -> None:
        with self._lock:
            self._waiting.pop(call, None)

    def _serve(self) -> None:
        for call, value, error in messages(self._read):
            with self._lock:
                future = self._waiting.pop(call, None)
            if future is None:
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(ShardError(error))


_answers: Answers | None = None
_answers_lock = threading.Lock()


def answers() -> Answers:
    """This process's ``Answers`` (made on first use)."""
    global _answers
    with _answers_lock:
        if _answers is None or _answers.pid != os.getpid():  # none yet, or a forked child's
            _answers = Answers()
        return _answers


# -- a replica's view of a shard on its host --------------------------------------------------------
class SharedShard:
    """A shard of this host: fetches copy its parameters out of its segment; pushes of a buffer
    from ``empty`` to a shard in another process send only the buffer's ``Ref``, through its
    mailbox; every other call goes to the actor as usual (``local``: a ``LocalActor``, whose
    calls pass arrays by reference already)."""

    def __init__(self, actor, segment: Segment, local: bool = False):
        self.actor, self.segment, self._local = actor, segment, local
        self._address, self.key = actor._address, actor.key
        self._mail = None
        if segment.ref.mail is not None and not local:
            self._mail = reopen(segment.ref.pid, segment.ref.mail, os.O_WRONLY)
            weakref.finalize(self, os.close, self._mail)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.actor, name)

    def read_into(self, out: np.ndarray) -> int:
        """Copy the shard's parameters into ``out``; the version they are (counted as a fetch)."""
        header = self.segment.header
        with self.segment.locked():
            np.copyto(out, self.segment.values)
            header[FETCHES] += 1
            header[BYTES_OUT] += out.nbytes
            return int(header[VERSION])

    def push(self, grad, *args):
        """``ParameterShard.push``; a buffer from ``empty`` goes by name, through the shard's
        mailbox when it has one."""
        ref = None if self._local else ref_of(grad)
        if ref is None or self._mail is None:
            return self.actor.push(grad if ref is None else ref, *args)
        box = answers()
        call, future = box.expect()
        try:
            send(self._mail, ((os.getpid(), box.fd), call, (ref, *args)))
        except BaseException:
            box.forget(call)
            raise
        return future


def near(actor, here: str, ref: Ref | None, local: bool = False):
    """``actor`` as a ``SharedShard`` when it lives on the host of worker address ``here`` and
    this process can map its segment ``ref``; otherwise ``actor`` itself. ``local``: ``actor``
    is a ``LocalActor`` of this very process (its fetches still skip the actor thread)."""
    if ref is None or not enabled() or get_address_host(here) != get_address_host(actor._address):
        return actor
    try:
        return SharedShard(actor, Segment.attach(ref), local)
    except OSError:
        return actor
