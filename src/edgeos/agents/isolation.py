"""Running an agent's step code in a worker process with memory and CPU limits.

``isolation: process`` in ``agent.yaml`` puts an agent's step functions in a child process
of their own: a step that leaks memory, spins or segfaults takes down its worker, never
the node or other agents. :class:`IsolatedWorker` owns one such child; ``call`` runs
``module.function(payload)`` in it and returns the result.

How, and why this way:

- **subprocess, not multiprocessing.** The child is a fresh interpreter running
  ``_worker.py`` (stdlib only, started with ``python -P`` so neither the working directory
  nor the ``edgeos`` package is imported), so its baseline under the memory limit is a few
  MB and nothing of the parent — threads, locks, an ONNX session — is inherited, as a fork
  would. Its exit status says exactly how it died. multiprocessing would pickle payloads
  (we want JSON across the boundary) and hides a dead child behind a broken pool or pipe.
- **JSON lines over pipes.** One request, one reply, in order; the child keeps private
  copies of its stdin/stdout and points fds 0 and 1 elsewhere, so a step that prints
  cannot corrupt the protocol. Between the two, an agent step may make callbacks (a model
  call, answered by the node): the child writes ``{"callback": ...}`` and waits for the
  parent's answer line before it goes on (see :meth:`IsolatedWorker.run_step`). Its
  stderr (and prints) is kept as a short tail for crash reports and logged at DEBUG on
  ``edgeos.agents.worker``.
- **Limits set by the child on itself**, first thing: ``RLIMIT_AS`` (soft == hard, so step
  code cannot lift it) and ``RLIMIT_CORE`` = 0. ``RLIMIT_CPU`` counts a process's whole
  lifetime, so its soft limit is re-armed before each call to "``cpu_seconds`` more" (whole
  seconds, so a step gets between ``cpu_seconds`` and ``cpu_seconds + 1``); past it SIGXCPU
  ends the child. The parent does not use ``preexec_fn``, which is unsafe in a threaded
  process.
- **A session of its own**: a Ctrl-C in the node's terminal does not reach the workers, and
  a kill reaches the whole process group (anything the step spawned). When the node dies,
  an idle worker sees its stdin close and exits.

``RLIMIT_AS`` bounds *virtual* memory: libraries that reserve address space up front (an
OpenBLAS thread pool, a JIT) need headroom above what they touch.

A crash (the child died, or overran the call's timeout and was killed) raises
:class:`WorkerCrashed`; the next call starts a new child, first sleeping
:func:`~edgeos.limits.backoff_delay` of the number of consecutive crashes. An
exception in the step is not a crash: it raises :class:`StepFailed` and the child lives on.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Literal

from edgeos.agents._worker import EXIT_MEMORY
from edgeos.errors import EdgeOSError, InvalidRequestError, NotFoundError
from edgeos.limits import backoff_delay

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
#: How many lines of the child's stderr a crash report keeps.
STDERR_TAIL_LINES = 40

JSONObject = dict[str, Any]
CrashKind = Literal["memory", "cpu", "timeout", "signal", "exit", "protocol", "spawn", "stopped"]

log = logging.getLogger("edgeos.agents.worker")


class WorkerCrashed(EdgeOSError):
    """The worker process died or was killed; the next call starts a new one (retryable).

    ``kind`` is one of ``memory``, ``cpu``, ``timeout``, ``signal``, ``exit``, ``protocol``,
    ``spawn`` (could not start a process) or ``stopped`` (stopped by
    :meth:`IsolatedWorker.stop` during the call);
    ``returncode`` is the child's exit status (negative: the signal that ended it).
    """

    retryable: bool = True
    http_status: ClassVar[int] = 503

    def __init__(
        self,
        *,
        worker: str,
        pid: int | None,
        kind: CrashKind,
        reason: str,
        returncode: int | None,
        stderr_tail: str = "",
    ) -> None:
        self.worker = worker
        self.pid = pid
        self.kind = kind
        self.reason = reason
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(f"agent worker {worker!r} (pid {pid}) {reason}")


class StepFailed(EdgeOSError):
    """The step function raised (or returned something that is not a JSON object).

    The worker is fine and stays up; ``exc_type``, ``exc_message`` and ``traceback`` are
    the exception as the child saw it. ``permanent`` is True when an agent step misused
    its ``ctx`` (the child's ``StepError``): running it again would fail the same way.
    """

    http_status: ClassVar[int] = 500

    def __init__(
        self,
        *,
        worker: str,
        function: str,
        exc_type: str,
        exc_message: str,
        traceback: str,
        permanent: bool = False,
    ) -> None:
        self.worker = worker
        self.function = function
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback
        self.permanent = permanent
        super().__init__(f"agent worker {worker!r}: {function} raised {exc_type}: {exc_message}")


class WorkerBusy(EdgeOSError):
    """The call's deadline passed before its step could begin; nothing ran (retryable).

    The worker was running other calls, or restarting, the whole time.
    """

    retryable: bool = True
    http_status: ClassVar[int] = 503

    def __init__(self, *, worker: str, reason: str) -> None:
        self.worker = worker
        super().__init__(f"agent worker {worker!r} {reason}")


class _Timeout(Exception):
    """Internal: no reply before the deadline."""


class _BadReply(Exception):
    """Internal: the child wrote a line that is not a JSON object."""

    def __init__(self, line: bytes) -> None:
        super().__init__(line[:200])
        self.line = line


#: Serves a child's callback during :meth:`IsolatedWorker.run_step`: gets the callback
#: message, returns the answer (JSON), or raises to raise in the step.
CallbackHandler = Callable[[JSONObject], Any]


class _Child:
    """One running worker process, its read buffer and its stderr tail."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.buffer = bytearray()
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        self.stdin_fd = proc.stdin.fileno()
        self.stdout_fd = proc.stdout.fileno()
        self.reader = threading.Thread(
            target=self._drain, args=(proc.stderr,), name=f"edgeos-worker-{name}-stderr"
        )
        self.reader.daemon = True
        self.reader.start()

    def _drain(self, stream: IO[bytes]) -> None:
        # Always drained, else a chatty step would fill the pipe and block forever.
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                self.tail.append(line)
                log.debug("[%s] %s", self.pid, line)

    def stderr_tail(self) -> str:
        return "\n".join(self.tail)


class IsolatedWorker:
    """A worker process running one agent's step module under memory and CPU limits.

    ``memory_mb`` / ``cpu_seconds`` of None mean no limit. Calls are serialized: one step
    runs at a time per worker. The worker starts on :meth:`start` or on the first call, and
    again on the call after a crash, after ``backoff(consecutive_crashes)`` seconds of
    ``sleep`` (both injectable, for tests). A successful call resets the crash count.
    """

    def __init__(
        self,
        module_path: Path,
        *,
        memory_mb: int | None,
        cpu_seconds: int | None,
        name: str,
        start_timeout: float = 30.0,
        backoff: Callable[[int], float] = backoff_delay,
        sleep: Callable[[float], None] = time.sleep,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        for label, value in (("memory_mb", memory_mb), ("cpu_seconds", cpu_seconds)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be at least 1 (or None: no limit), got {value}")
        self.module_path = Path(module_path).resolve()
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds
        self.name = name
        self.start_timeout = start_timeout
        self._backoff = backoff
        self._sleep = sleep
        self._env = dict(env) if env is not None else None
        self._python = python
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._crashes = 0
        self._stop_requested = False
        self.last_crash: WorkerCrashed | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None."""
        child = self._child
        return None if child is None else child.pid

    @property
    def alive(self) -> bool:
        """Whether a child is running (it may still die before the next call)."""
        child = self._child
        # Not Popen.poll(): that would reap the child, and _reap relies on its pid staying
        # reserved until then.
        return child is not None and not _has_exited(child.pid)

    @property
    def crashes(self) -> int:
        """Consecutive crashes since the last successful call."""
        return self._crashes

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the child now (no backoff) unless it runs; wait until it is ready.

        Raises :class:`StepFailed` if the module does not import and
        :class:`WorkerCrashed` if the child dies or does not get ready in time.
        """
        with self._lock:
            if self._child is None:
                self._start_locked()

    def stop(self, grace: float = 2.0) -> None:
        """Stop the child: close its stdin and give it ``grace`` seconds, then kill it.

        Safe from another thread while a call runs: the child is killed at once and that
        call raises :class:`WorkerCrashed` of kind ``stopped``.
        """
        child = self._child
        if not self._lock.acquire(blocking=False):
            self._stop_requested = True
            if child is not None:
                _kill_group(child.pid)
            self._lock.acquire()
        try:
            self._stop_requested = False
            if self._child is not None:
                self._shutdown(self._child, grace)
                self._child = None
        finally:
            self._lock.release()

    def stop_if_idle(self, grace: float = 2.0) -> bool:
        """Stop the child unless a call is in progress; False if one is (nothing changes).

        For retiring a worker that callers may still use: unlike :meth:`stop`, it never
        cuts a step short, and a later call simply starts a new child.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._child is not None:
                self._shutdown(self._child, grace)
                self._child = None
        finally:
            self._lock.release()
        return True

    def restart(self) -> None:
        """Stop the child and start a new one (no backoff: this restart was asked for)."""
        self.stop()
        self.start()

    def __enter__(self) -> IsolatedWorker:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- calls -------------------------------------------------------------------------

    def call(self, function_name: str, payload: Mapping[str, Any], timeout: float) -> JSONObject:
        """Run ``module.function_name(payload)`` in the child; return its result.

        ``timeout`` bounds the step itself (not a restart's backoff or start-up): past it
        the child is killed. Raises :class:`WorkerCrashed` (the child died; the next call
        restarts it), :class:`StepFailed` (the function raised), :class:`NotFoundError`
        (no such function) or :class:`InvalidRequestError` (payload not JSON).
        """
        return self._request(
            {"function": function_name, "payload": dict(payload)}, function_name, timeout, None
        )

    def run_step(
        self,
        step: str,
        context: Mapping[str, Any],
        data: Any,
        timeout: float,
        on_callback: CallbackHandler,
        *,
        deadline: float | None = None,
    ) -> JSONObject:
        """Run the agent step ``module.step(ctx, data)`` in the child; return its outcome.

        The child builds ``ctx`` from ``context`` (see ``_worker.StepContext``) and the
        outcome says how the step ended (see ``_worker.run_step``). Callbacks the step makes
        meanwhile are served by ``on_callback`` on the calling thread, within ``timeout``;
        an exception it raises is raised in the step, and if the step lets it through, it
        is re-raised here as itself (not as :class:`StepFailed`), as if the step had run
        in this process. Otherwise raises what :meth:`call` raises.

        ``deadline`` (``time.monotonic()``) is when the caller stops waiting: for the
        worker to be free of other calls, for a restart, and for the step, whose
        ``timeout`` it shortens. :class:`WorkerBusy` if it passed before the step began
        (the step did not run); past it, the step is killed as past its timeout.
        """
        request = {"step": step, "context": dict(context), "data": data}
        return self._request(request, step, timeout, on_callback, deadline)

    def _request(
        self,
        request: JSONObject,
        function_name: str,
        timeout: float,
        on_callback: CallbackHandler | None,
        deadline: float | None = None,
    ) -> JSONObject:
        try:
            line_out = json.dumps(request).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(
                f"payload for {function_name} is not JSON-serializable: {exc}"
            ) from exc
        raised: dict[int, Exception] = {}
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait):
            raise WorkerBusy(
                worker=self.name,
                reason=f"was busy with other calls until the deadline of {function_name}, "
                "which did not run",
            )
        try:
            reply = self._exchange_locked(
                line_out, function_name, timeout, deadline, on_callback, raised
            )
        finally:
            self._lock.release()
        if "ok" in reply:
            result: JSONObject = reply["ok"]
            return result
        if "missing" in reply:
            raise NotFoundError(
                f"agent step module {self.module_path} has no function {function_name!r}"
            )
        error = reply.get("error")
        token = error.get("token") if isinstance(error, dict) else None
        if isinstance(token, int) and token in raised:
            raise raised[token]  # the callback's own exception, which the step let through
        raise self._step_failed(function_name, error)

    def _exchange_locked(
        self,
        request: bytes,
        function_name: str,
        timeout: float,
        deadline: float | None,
        on_callback: CallbackHandler | None,
        raised: dict[int, Exception],
    ) -> JSONObject:
        """Send the request (starting the child first if need be); return the reply."""
        if self._child is not None and _has_exited(self._child.pid):
            # It died between calls (the OOM killer, a kill by hand): record that and
            # start afresh, rather than failing a step that never ran.
            self._crashed(self._child, kill=False, during="an idle period")
        if self._child is None:
            if self._crashes:
                self._sleep(self._backoff(self._crashes))
            self._start_locked()
        assert self._child is not None
        child = self._child
        limit = timeout
        if deadline is not None:
            limit = min(timeout, deadline - time.monotonic())
            if limit <= 0:
                # A restart's backoff and start-up used up the caller's time. Not the
                # child's fault: it stays, and no crash is counted (a count that grew
                # here would only lengthen the next backoff).
                raise WorkerBusy(
                    worker=self.name,
                    reason=f"was restarting until the deadline of {function_name}, "
                    "which did not run",
                )
        try:
            reply = _converse(child, request, time.monotonic() + limit, on_callback, raised)
        except _Timeout:
            raise self._crashed(
                child,
                kill=True,
                kind="timeout",
                # The caller's timeout, even when start-up left the step less of it: that
                # is the limit the caller set and will recognise.
                reason=f"ran {function_name} longer than its {timeout:g} s timeout and was killed",
            ) from None
        except _BadReply as bad:
            raise self._crashed(
                child,
                kill=True,
                kind="protocol",
                reason=f"sent a bad reply: {bad.line[:200]!r}",
            ) from None
        except BrokenPipeError:
            reply = None
        except BaseException:
            # Interrupted mid-call (KeyboardInterrupt, a signal handler's exception): the
            # reply would arrive out of step with the next request, so end this child.
            self._reap(child, kill=True)
            self._child = None
            raise
        if reply is None:
            raise self._crashed(child, kill=False, during=function_name)
        self._crashes = 0  # the child answered: it is healthy, whatever the step did
        return reply

    # -- internals ---------------------------------------------------------------------

    def _start_locked(self) -> None:
        command = [
            self._python, "-P", str(WORKER_SCRIPT), str(self.module_path),
            str(self.memory_mb or 0), str(self.cpu_seconds or 0),
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=self._env,
            )
        except OSError as exc:  # EAGAIN at the process limit, a missing interpreter, ...
            self._crashes += 1
            raise WorkerCrashed(
                worker=self.name,
                pid=None,
                kind="spawn",
                reason=f"could not be started: {exc}",
                returncode=None,
            ) from exc
        child = _Child(proc, self.name)
        self._child = child
        try:
            line = _read_line(child, time.monotonic() + self.start_timeout)
        except _Timeout:
            raise self._crashed(
                child,
                kill=True,
                kind="timeout",
                reason=f"did not start within {self.start_timeout:g} s",
            ) from None
        except BaseException:
            self._reap(child, kill=True)
            self._child = None
            raise
        if line is None:
            raise self._crashed(child, kill=False, during="start-up")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and "ready" in reply:
            log.info("agent worker %r started (pid %s)", self.name, child.pid)
            return
        self._reap(child, kill=True)
        self._child = None
        if isinstance(reply, dict) and "error" in reply:
            raise self._step_failed(f"import of {self.module_path.name}", reply["error"])
        raise self._record_crash(child, None, kind="protocol", reason="sent a bad greeting")

    def _crashed(
        self,
        child: _Child,
        *,
        kill: bool,
        kind: CrashKind | None = None,
        reason: str | None = None,
        during: str | None = None,
    ) -> WorkerCrashed:
        returncode = self._reap(child, kill=kill)
        return self._record_crash(child, returncode, kind=kind, reason=reason, during=during)

    def _record_crash(
        self,
        child: _Child,
        returncode: int | None,
        *,
        kind: CrashKind | None = None,
        reason: str | None = None,
        during: str | None = None,
    ) -> WorkerCrashed:
        self._child = None
        if self._stop_requested:
            kind, reason = "stopped", "was stopped while running a step"
        elif kind is None or reason is None:
            kind, reason = _describe(returncode, self.memory_mb, self.cpu_seconds)
            if during:
                reason += f" during {during}"
        crash = WorkerCrashed(
            worker=self.name,
            pid=child.pid,
            kind=kind,
            reason=reason,
            returncode=returncode,
            stderr_tail=child.stderr_tail(),
        )
        if kind != "stopped":
            self._crashes += 1
            self.last_crash = crash
            log.warning("%s (crash %d in a row)", crash, self._crashes)
        return crash

    def _step_failed(self, function: str, error: object) -> StepFailed:
        fields = error if isinstance(error, dict) else {}
        return StepFailed(
            worker=self.name,
            function=function,
            exc_type=str(fields.get("type", "Exception")),
            exc_message=str(fields.get("message", "")),
            traceback=str(fields.get("traceback", "")),
            permanent=fields.get("permanent") is True,
        )

    def _shutdown(self, child: _Child, grace: float) -> None:
        if child.proc.stdin is not None:
            # EOF: an idle child exits by itself. Closed through the file object, never by
            # fd number, so the later close in _reap cannot hit a reused descriptor.
            with contextlib.suppress(OSError):
                child.proc.stdin.close()
        _wait_for_exit(child.pid, grace)
        self._reap(child, kill=True)

    def _reap(self, child: _Child, *, kill: bool) -> int | None:
        """Make sure the child and its process group are gone; return its exit status."""
        if not kill:
            # It closed its pipe: it is exiting. Let it finish so its own exit status (not
            # our SIGKILL) is what gets reported, but not forever.
            _wait_for_exit(child.pid, 2.0)
        # The child is not reaped yet, so its pid (= its process group id) cannot have been
        # reused: killing the group is safe, and takes anything the step spawned with it.
        _kill_group(child.pid)
        returncode = child.proc.wait()
        for stream in (child.proc.stdin, child.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        child.reader.join(timeout=1.0)
        return returncode


def _describe(
    returncode: int | None, memory_mb: int | None, cpu_seconds: int | None
) -> tuple[CrashKind, str]:
    if returncode == EXIT_MEMORY:
        return "memory", f"crashed: reached its memory limit of {memory_mb} MB (MemoryError)"
    if returncode == -signal.SIGXCPU:
        return "cpu", f"was killed: used up its CPU limit of {cpu_seconds} s per call (SIGXCPU)"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if returncode == -signal.SIGKILL:
            name += " (the kernel's OOM killer, or another process)"
        return "signal", f"was killed by {name}"
    return "exit", f"exited unexpectedly with code {returncode}"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _has_exited(pid: int) -> bool:
    """Whether the child ``pid`` has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited, without reaping it: its pid stays reserved."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        if _has_exited(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _converse(
    child: _Child,
    request: bytes,
    deadline: float,
    on_callback: CallbackHandler | None,
    raised: dict[int, Exception],
) -> JSONObject | None:
    """Send a request, serve the child's callbacks, and return its reply (None at EOF).

    An exception from ``on_callback`` goes to the child as ``{"raise": ...}`` with a token
    and is kept in ``raised`` under it, so the caller can re-raise it if the step did not
    handle it.
    """
    _write_all(child.stdin_fd, request)
    while True:
        line = _read_line(child, deadline)
        if line is None:
            return None
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            raise _BadReply(line)
        if "callback" not in message:
            return message
        try:
            if on_callback is None:
                raise InvalidRequestError("this call takes no callbacks")
            answer = {"answer": on_callback(message)}
            text = json.dumps(answer)
        except Exception as exc:  # raised in the step, as it would be in this process
            token = len(raised) + 1
            raised[token] = exc
            text = json.dumps(
                {"raise": {"type": type(exc).__name__, "message": str(exc), "token": token}}
            )
        _write_all(child.stdin_fd, text.encode() + b"\n")


def _read_line(child: _Child, deadline: float) -> bytes | None:
    """The next line from the child (without the newline); None at EOF.

    ``poll`` rather than ``select``: a busy node may hold file descriptors above 1024.
    """
    poller = select.poll()
    poller.register(child.stdout_fd, select.POLLIN)
    while True:
        end = child.buffer.find(b"\n")
        if end >= 0:
            line = bytes(child.buffer[:end])
            del child.buffer[: end + 1]
            return line
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        if not poller.poll(max(1, int(remaining * 1000))):
            continue
        chunk = os.read(child.stdout_fd, 1 << 16)
        if not chunk:
            return None
        child.buffer += chunk
