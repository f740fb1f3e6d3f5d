"""The /predict request path between the HTTP processes and the inference workers.

LitServe's own path sends every request through its Manager process: the body pickled
into the Manager and out again, four Manager round trips, and a thread hop per answer in
the HTTP process. For a 160 kB WAV that cost ~0.7 ms of CPU a request against ~0.2 ms
here (experiments/README.md, issue 16), on a box where the whole request costs ~7 ms.
Here the kernel is the queue:

- Requests: one Unix datagram socket, bound by the main process before the workers start
  and handed to each of them with the LitAPI (multiprocessing passes the descriptor).
  Every worker receives on the same socket, so a free worker takes whatever is queued,
  and there is no user-space lock that a killed worker could leave held. A request is a
  small pickled header; its audio travels beside it as a file descriptor (SCM_RIGHTS) to
  an in-memory file, so a body of any size costs one write and one read, and the kernel
  frees it with the last descriptor, whichever process dies.
- Answers: each HTTP process binds its own datagram socket and reads it from its event
  loop (no thread), matching answers to waiting requests by number; a worker sends a
  batch's answers to one HTTP process in one datagram.

The kernel queues at most `net.unix.max_dgram_qlen` requests (10 by default); the rest
wait their turn in the HTTP process. A worker that dies loses the requests it had taken:
their clients get a 504 once `request_timeout` + LOST_AFTER_S have passed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import itertools
import logging
import os
import pickle
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .http_helpers import dumps

log = logging.getLogger("faultsense.serve")

# A request header is a few hundred bytes: the answer socket's path (< 108), numbers, and
# the file name, cut to NAME_CHARS (<= 4 bytes each in UTF-8).
HEADER_BYTES = 4096
NAME_CHARS = 512
# The largest datagram of answers a worker sends (bigger batches go in pieces) and the
# HTTP side's receive buffer; a prediction's JSON is a few kB even for a 10-minute clip.
ANSWER_BYTES = 1 << 18
# How long an HTTP process waits past `request_timeout` before it calls a request lost
# (its worker died holding it) and answers 504.
LOST_AFTER_S = 60.0
# How long a worker may block sending an answer to an HTTP process that does not read.
ANSWER_SEND_TIMEOUT_S = 10.0
FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)  # one descriptor per request
NO_STAMPS = (0.0,) * 7  # serving/worker.py STAMPS, for an answer no worker stamped


@dataclass
class Request:
    """A /predict request as a worker takes it off the channel."""

    answer_to: str  # the HTTP process's answer socket
    uid: int
    # perf_counter in the HTTP process once the body was read (one system-wide clock: a
    # worker compares it with its own for request_timeout)
    t_submit: float
    name: str
    audio: bytes | None  # None: the body did not arrive with the header
    t_got: float = 0.0  # perf_counter when a worker took it


class Channel:
    """Made once in the main process (`Channel.open()`) and handed to the workers inside
    the LitAPI; the HTTP processes (forked from the main one) each use `client()`."""

    def __init__(self, directory: str, requests: socket.socket) -> None:
        self.directory = directory
        self.requests = requests  # the receiving end, shared by every worker
        self._poller: Any = None
        self._answers_out: socket.socket | None = None
        self._client: ChannelClient | None = None

    @classmethod
    def open(cls) -> Channel:
        # mkdtemp's folder is the user's alone (0700): no other user can reach the sockets
        # (answers are unpickled).
        channel = cls(
            tempfile.mkdtemp(prefix="faultsense-ipc-"),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
        )
        channel.requests.bind(channel.request_path)
        return channel

    @property
    def request_path(self) -> str:
        return os.path.join(self.directory, "requests")

    def close(self) -> None:
        """Remove the sockets (main process, at shutdown)."""
        self.requests.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __getstate__(self) -> dict:
        # Only multiprocessing's pickler can carry the socket (it passes the descriptor).
        return {"directory": self.directory, "requests": self.requests}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["requests"])

    # -- worker side ------------------------------------------------------------------------

    def take(self, max_items: int, extra_wait: float, idle_wait: float) -> list[Request]:
        """The first request (waiting up to `idle_wait` s; [] when none came) and those
        queued behind it, up to `max_items`; waits up to `extra_wait` s more for others
        once the queue is empty (0: never)."""
        if not self._readable(idle_wait):
            return []
        taken: list[Request] = []
        deadline = time.perf_counter() + max(0.0, extra_wait)
        while len(taken) < max_items:
            try:
                # Not socket.recv_fds: Python 3.11's drops its flags argument.
                msg, ancillary, _, _ = self.requests.recvmsg(
                    HEADER_BYTES, FD_SPACE, socket.MSG_DONTWAIT
                )
            except BlockingIOError:  # empty (or another worker was quicker)
                left = deadline - time.perf_counter()
                if not taken or left <= 0 or not self._readable(left):
                    break
                continue
            taken.append(_unpack(msg, _fds(ancillary), time.perf_counter()))
        return taken

    def answer(self, answers: Iterable[tuple[Request, int, bytes, tuple]]) -> None:
        """Send each request's (status, JSON body, stamps) to its HTTP process: a batch's
        answers to one process go as one datagram (one wake-up of its event loop). A
        process that has gone away is skipped."""
        if self._answers_out is None:
            self._answers_out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._answers_out.settimeout(ANSWER_SEND_TIMEOUT_S)
            # Room for an ANSWER_BYTES datagram whatever the system's default (macOS: 2 kB).
            self._answers_out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ANSWER_BYTES)
        by_process: dict[str, list[tuple]] = {}
        for request, status, body, stamps in answers:
            by_process.setdefault(request.answer_to, []).append((request.uid, status, body, stamps))
        for address, items in by_process.items():
            self._send_answers(address, items)

    def _send_answers(self, address: str, items: list[tuple]) -> None:
        assert self._answers_out is not None
        data = pickle.dumps(items, pickle.HIGHEST_PROTOCOL)
        if len(data) <= ANSWER_BYTES:  # the HTTP side's buffer
            try:
                self._answers_out.sendto(data, address)
                return
            except OSError as err:
                if err.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    log.warning("Answers to %s not sent (HTTP process gone?): %s", address, err)
                    return
        if len(items) > 1:  # too big for one datagram: in halves
            half = len(items) // 2
            self._send_answers(address, items[:half])
            self._send_answers(address, items[half:])
            return
        # One answer too big to send: say so rather than leave the client waiting.
        uid, _, body, stamps = items[0]
        log.error("An answer of %d bytes was too large to send", len(body))
        error = dumps({"error": "The answer was too large to send; the server log has details."})
        self._send_answers(address, [(uid, 500, error, stamps)])

    def _readable(self, timeout: float) -> bool:
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.requests, select.POLLIN)
        return bool(self._poller.poll(max(0, int(timeout * 1000))))

    # -- HTTP side --------------------------------------------------------------------------

    def client(self) -> ChannelClient:
        """This process's client (made on first use, inside its event loop)."""
        if self._client is None or self._client.pid != os.getpid():
            self._client = ChannelClient(self)
        return self._client


def _fds(ancillary: list) -> list[int]:
    """The file descriptors passed in a message's ancillary data."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _unpack(msg: bytes, fds: list[int], got: float) -> Request:
    """A request from its header and body descriptor (closed here)."""
    answer_to, uid, t_submit, name, size = pickle.loads(msg)
    audio = None
    try:
        if fds:
            audio = os.pread(fds[0], size, 0)
            if len(audio) != size:
                audio = None
    finally:
        for fd in fds:
            os.close(fd)
    return Request(answer_to, uid, t_submit, name, audio, got)


def _body_fd(data: bytes) -> int:
    """A descriptor of an unnamed in-memory file holding `data` (the caller closes it)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("faultsense-request", os.MFD_CLOEXEC)
    else:  # macOS: an unlinked temp file does the same
        fd, path = tempfile.mkstemp(prefix="faultsense-request-")
        os.unlink(path)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


class ChannelClient:
    """An HTTP process's end: `await predict(...)` sends one request and waits for its
    answer. Answers are read by an event-loop reader, never a thread."""

    def __init__(self, channel: Channel) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.get_running_loop()
        self.answer_path = os.path.join(channel.directory, f"answers-{self.pid}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.answer_path)  # left by a process that had this pid before
        self._answers = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._answers.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ANSWER_BYTES)
        self._answers.bind(self.answer_path)
        self._answers.setblocking(False)
        self._requests = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._requests.connect(channel.request_path)
        self._requests.setblocking(False)
        self._buffer = memoryview(bytearray(ANSWER_BYTES))
        self._pending: dict[int, asyncio.Future] = {}
        self._uids = itertools.count()
        self._send_lock = asyncio.Lock()  # one waiter for a full queue at a time, in order
        self.loop.add_reader(self._answers.fileno(), self._read_answers)

    async def predict(
        self, audio: bytes, name: str, t_submit: float, wait: float
    ) -> tuple[int, bytes, tuple]:
        """(status, JSON body, the worker's stamps) for one request; a 504 when no answer
        came within `wait` s."""
        uid = next(self._uids)
        answer = self.loop.create_future()
        self._pending[uid] = answer
        # The name is only quoted in messages; capped so a header always fits HEADER_BYTES.
        header = (self.answer_path, uid, t_submit, name[:NAME_CHARS], len(audio))
        try:
            async with asyncio.timeout(wait):
                await self._send(pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL), audio)
                return await answer
        except TimeoutError:
            error = f"No inference worker answered within {wait:g} s; try again."
            return 504, dumps({"error": error}), NO_STAMPS
        finally:
            self._pending.pop(uid, None)

    async def _send(self, header: bytes, audio: bytes) -> None:
        fd = _body_fd(audio)
        try:
            async with self._send_lock:
                while True:
                    try:
                        socket.send_fds(self._requests, [header], [fd])
                        return
                    except BlockingIOError:  # the kernel's queue is full: wait for room
                        await self._writable()
        finally:
            os.close(fd)

    async def _writable(self) -> None:
        room = self.loop.create_future()
        self.loop.add_writer(self._requests.fileno(), room.set_result, None)
        try:
            await room
        finally:
            self.loop.remove_writer(self._requests.fileno())

    def _read_answers(self) -> None:
        while True:
            try:
                n = self._answers.recv_into(self._buffer)
            except BlockingIOError:
                return
            for uid, status, body, stamps in pickle.loads(self._buffer[:n]):
                answer = self._pending.get(uid)
                if answer is not None and not answer.done():
                    answer.set_result((status, body, stamps))
