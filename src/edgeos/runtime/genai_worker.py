"""A generative model's worker process: ONNX Runtime GenAI generating off the node's GIL.

ONNX Runtime GenAI holds the GIL while it computes a token, so a model generating inside
the node's process stalls the node's event loop for as long as each token takes. Each
loaded generative model runs in a process of its own instead:

- :class:`Worker`, the node's side, spawns ``python -m edgeos.runtime.genai_worker DIR FD``,
  sends it requests over a pipe and hands each event that comes back to the callback of
  the request it belongs to (on a reader thread, which blocks without the GIL). When the
  process dies, every request in flight hears ``gone`` and a new process is started.
- :func:`serve`, the worker's side, loads the model, tokenizes, and generates a token for
  each request in turn, each at most :data:`AHEAD` pieces ahead of its reader.

Messages are pickled tuples ``(kind, request id, ...)``. To the worker: ``encode`` (text),
``start`` (token ids, budget, search options, guidance constraint or None), ``credit`` (the
reader took that many pieces; sent every :data:`CREDIT` pieces, each message costing the
worker a wake-up), ``cancel``. From it: ``ready`` or ``failed`` (once, after loading),
``encoded`` (ids), ``token`` (text), ``end`` (outcome, tokens made), ``error`` (message,
tokens made).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeos.errors import ConfigError, EdgeOSError, InvalidModelError, UnavailableError

# Pieces a generation may run ahead of its reader: a slow reader slows it down, and one
# that stopped reading leaves it waiting rather than filling memory.
AHEAD = 16
# Pieces the reader takes before it tells the worker so.
CREDIT = AHEAD // 2

Message = tuple[Any, ...]
Deliver = Callable[[Message], None]

# Load errors the worker reports by name, raised again on the node's side as themselves.
_LOAD_ERRORS: dict[str, type[EdgeOSError]] = {
    "ConfigError": ConfigError,
    "InvalidModelError": InvalidModelError,
}


# What reading a channel whose other end is gone raises: the end of the stream, a message
# cut short, or a file closed under a blocked reader.
_GONE = (EOFError, OSError, ValueError, pickle.UnpicklingError)


class Channel:
    """Pickled messages over a socket, read through a buffer: events that queue up while
    the reader is busy are read with one system call."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._in = sock.makefile("rb")

    def send(self, message: Message) -> None:
        """Write one message; OSError when the other end is gone."""
        self._sock.sendall(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def recv(self) -> Message:
        """The next message; EOFError when the other end is gone."""
        message: Message = pickle.load(self._in)
        return message

    def close(self) -> None:
        """Close, waking a thread blocked in :meth:`recv`."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._in.close()
        self._sock.close()


class Worker:
    """The node's handle on one model's worker process."""

    def __init__(self, directory: Path, what: str) -> None:
        """Start the process and wait until it has loaded the model; raises its load error
        (InvalidModelError, ConfigError) or UnavailableError when it could not start."""
        self.directory = directory
        self.what = what
        self._lock = threading.Lock()  # the connection, the calls and their ids
        # Writes to the socket, apart: a write that waits for the worker to read must not
        # hold up the reader thread, which needs the lock above to finish requests.
        self._sending = threading.Lock()
        self._calls: dict[int, Deliver] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._broken = ""  # why a restart failed: every later call hears it
        self._process: subprocess.Popen[bytes]
        self._conn: Channel | None
        self._process, self._conn = self._spawn()
        threading.Thread(target=self._read, name=f"genai-reader-{what}", daemon=True).start()

    @property
    def pid(self) -> int:
        """The worker process's id (a restarted worker has a new one)."""
        return self._process.pid

    def call(self, deliver: Deliver, kind: str, *args: Any) -> int:
        """Send a request; ``deliver`` hears each event of it (on the reader thread), and
        ``("gone", id, reason)`` if the process dies first. Returns the request's id."""
        with self._lock:
            conn = self._conn
            if self._closed or self._broken or conn is None:
                raise UnavailableError(self._why_not())
            rid = next(self._ids)
            self._calls[rid] = deliver
        try:
            with self._sending:
                conn.send((kind, rid, *args))
        except OSError:  # it died since: the reader fails the calls it had
            self.finish(rid)
            raise UnavailableError(f"{self.what}'s worker process exited; retry") from None
        return rid

    def tell(self, kind: str, rid: int, *args: Any) -> None:
        """Tell a running request something (``credit`` with a count, ``cancel``); lost if
        it has ended or the process is gone, which is what either would have meant."""
        with self._lock:
            conn = self._conn if rid in self._calls else None
        if conn is not None:
            with self._sending, contextlib.suppress(OSError):
                conn.send((kind, rid, *args))

    def finish(self, rid: int) -> None:
        """Forget a request that has ended: events still on their way are dropped."""
        with self._lock:
            self._calls.pop(rid, None)

    def encode(self, text: str) -> concurrent.futures.Future[list[int]]:
        """Token ids of ``text``, by the worker's tokenizer."""
        future: concurrent.futures.Future[list[int]] = concurrent.futures.Future()

        def deliver(message: Message) -> None:
            rid = message[1]
            self.finish(rid)
            if message[0] == "encoded":
                future.set_result(message[2])
            elif message[0] == "gone":
                future.set_exception(UnavailableError(message[2]))
            else:
                future.set_exception(UnavailableError(f"{self.what} cannot tokenize: {message[2]}"))

        self.call(deliver, "encode", text)
        return future

    def close(self) -> None:
        """Stop the process (it exits when its pipe closes; killed if it does not)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conn, process = self._conn, self._process
        if conn is not None:
            conn.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _why_not(self) -> str:
        if self._closed:
            return f"{self.what} was unloaded; ask again and it loads"
        if self._broken:
            return f"{self.what}'s worker process cannot restart: {self._broken}"
        return f"{self.what}'s worker process is restarting; retry shortly"

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Channel]:
        pair = socket.socketpair()
        ours, theirs = Channel(pair[0]), pair[1]
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "edgeos.runtime.genai_worker", str(self.directory),
                 str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C is the node's to handle; the worker
                # exits when the node closes its socket (or dies).
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            raise UnavailableError(f"{self.what}: cannot start a worker process: {exc}") from exc
        finally:
            theirs.close()
        try:
            first = ours.recv()
        except _GONE:
            ours.close()
            code = process.wait()
            raise UnavailableError(
                f"{self.what}'s worker process exited while loading the model (status {code})"
            ) from None
        if first[0] == "failed":
            ours.close()
            process.wait()
            raise _LOAD_ERRORS.get(first[1], UnavailableError)(first[2])
        return process, ours

    def _read(self) -> None:
        """Hand events to their requests; when the process dies, fail what was in flight
        and start another."""
        while True:
            conn = self._conn
            assert conn is not None  # set before this thread starts and on each restart
            while True:
                try:
                    message = conn.recv()
                except _GONE:
                    break
                deliver = self._calls.get(message[1])
                if deliver is not None:
                    deliver(message)
            code = self._process.wait()
            with self._lock:
                calls, self._calls = self._calls, {}
                closed = self._closed
                self._conn = None
            reason = f"{self.what}'s worker process exited (status {code}); it is restarted"
            for rid, deliver in calls.items():
                deliver(("gone", rid, reason))
            conn.close()
            if closed:
                return
            try:
                process, conn = self._spawn()
            except EdgeOSError as exc:
                with self._lock:
                    self._broken = str(exc)
                return
            with self._lock:
                if self._closed:  # closed while restarting
                    conn.close()
                    process.kill()
                    process.wait()
                    return
                self._process, self._conn = process, conn


class _Run:
    """A request in the worker: what it asked, and how far it has got."""

    def __init__(
        self, ids: Sequence[int], budget: int, options: dict[str, Any],
        constraint: tuple[str, str] | None,
    ) -> None:  # fmt: skip
        self.ids, self.budget, self.options, self.constraint = ids, budget, options, constraint
        self.credits = AHEAD  # pieces it may send before the reader takes some
        self.cancelled = False
        self.produced = 0
        self.generator: Any = None  # made on its first step
        self.decoder: Any = None


def serve(directory: Path, conn: Channel) -> None:
    """The worker's loop: load the model, then answer requests until the pipe closes.

    One thread generates for every request, a token for each in turn: the model holds the
    GIL while it computes, so threads of their own would only contend for it.
    """
    from edgeos.runtime.chat_format import ChatFormat
    from edgeos.runtime.genai_store import load_genai, read_config

    try:
        config = read_config(directory)
        chat = ChatFormat.load(directory)
        model = load_genai(directory)
    except EdgeOSError as exc:
        conn.send(("failed", type(exc).__name__, str(exc)))
        return
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(model)
    # A model that opens another turn has finished its answer.
    markers = (chat.system, chat.user, chat.assistant, chat.end)
    encoded = [list(tokenizer.encode(m)) for m in markers]
    stop_ids = config.eos_ids | {int(e[0]) for e in encoded if len(e) == 1}
    sending = threading.Lock()
    changed = threading.Condition()  # guards runs and their credits and cancellation
    runs: dict[int, _Run] = {}

    def send(message: Message) -> None:
        with sending, contextlib.suppress(OSError):  # the node went away: we exit next
            conn.send(message)

    def step(rid: int, run: _Run) -> str | None:
        """Generate ``run``'s next token; how it ended, if it has."""
        if run.generator is None:
            params = og.GeneratorParams(model)
            params.set_search_options(**run.options)
            if run.constraint is not None:
                # Guidance masks every token that would leave the grammar, so the answer
                # parses and validates when it ends.
                params.set_guidance(*run.constraint)
            run.generator = og.Generator(model, params)
            run.decoder = tokenizer.create_stream()
            run.generator.append_tokens(list(run.ids))
        if run.generator.is_done() or run.produced >= run.budget:
            return "stop" if run.produced < run.budget else "length"
        run.generator.generate_next_token()
        token = int(run.generator.get_next_tokens()[0])
        if token in stop_ids:
            return "stop"
        run.produced += 1
        with changed:
            run.credits -= 1
        send(("token", rid, run.decoder.decode(token)))
        return None

    def generate() -> None:
        while True:
            with changed:
                while not (ready := [(r, run) for r, run in runs.items()
                                     if run.cancelled or run.credits > 0]):  # fmt: skip
                    changed.wait()
            for rid, run in ready:
                try:
                    outcome = "cancelled" if run.cancelled else step(rid, run)
                except Exception as exc:  # ORT GenAI raises plain RuntimeErrors
                    ended: Message = ("error", rid, str(exc), run.produced)
                else:
                    if outcome is None:
                        continue
                    ended = ("end", rid, outcome, run.produced)
                with changed:
                    del runs[rid]
                run.generator = None  # its KV cache goes before the node hears of the end
                send(ended)

    threading.Thread(target=generate, name="generate", daemon=True).start()
    send(("ready",))
    while True:
        try:
            kind, rid, *args = conn.recv()
        except _GONE:
            return
        if kind == "encode":
            try:
                send(("encoded", rid, tokenizer.encode(args[0]).tolist()))
            except Exception as exc:
                send(("error", rid, str(exc), 0))
            continue
        with changed:
            if kind == "start":
                runs[rid] = _Run(*args)
            elif (run := runs.get(rid)) is None:
                continue
            elif kind == "cancel":
                run.cancelled = True
            else:
                run.credits += args[0]
            changed.notify()


def main() -> None:
    """``python -m edgeos.runtime.genai_worker DIR FD``: serve the model in DIR on the
    socket at file descriptor FD, then exit without waiting for generating threads."""
    directory, fd = Path(sys.argv[1]), int(sys.argv[2])
    try:
        serve(directory, Channel(socket.socket(fileno=fd)))
    finally:
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
