"""Process isolation: real worker processes under real rlimits, crashing for real."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeos.agents.isolation import IsolatedWorker, StepFailed, WorkerCrashed
from edgeos.errors import InvalidRequestError, NotFoundError
from edgeos.retry import backoff_delay

STEP_MODULE = """
import ctypes
import os
import subprocess
import sys
import time


def ok(payload):
    return {"pid": os.getpid(), "echo": payload}


def boom(payload):
    raise ValueError(f"bad reading {payload['x']}")


def hog_memory(payload):
    data = bytearray(300 * 1024 * 1024)
    return {"size": len(data)}


def burn(payload):
    end = time.process_time() + payload["seconds"]
    while time.process_time() < end:
        pass
    return {"pid": os.getpid()}


def spin(payload):
    while True:
        pass


def sleep(payload):
    time.sleep(60)
    return {}


def chatty(payload):
    print("hello from the step")
    print("and from its stderr", file=sys.stderr)
    return {"printed": True}


def die(payload):
    print("about to die", file=sys.stderr, flush=True)
    os._exit(7)


def segfault(payload):
    ctypes.string_at(0)


def not_a_dict(payload):
    return [1, 2, 3]


def not_json(payload):
    return {"when": object()}


def spawn_and_sleep(payload):
    child = subprocess.Popen(["sleep", "60"])
    with open(payload["pid_file"], "w") as f:
        f.write(str(child.pid))
    time.sleep(60)
    return {}
"""

WorkerFactory = Callable[..., IsolatedWorker]


@pytest.fixture
def step_module(tmp_path: Path) -> Path:
    path = tmp_path / "steps.py"
    path.write_text(STEP_MODULE)
    return path


@pytest.fixture
def make_worker(step_module: Path) -> Iterator[WorkerFactory]:
    """Workers with a 128 MB / 1 CPU-second budget and no backoff sleep; all stopped after."""
    workers: list[IsolatedWorker] = []

    def make(**overrides: Any) -> IsolatedWorker:
        options: dict[str, Any] = {
            "memory_mb": 128,
            "cpu_seconds": 1,
            "name": f"agent-{len(workers)}",
            "backoff": lambda attempt: 0.0,
            "sleep": lambda seconds: None,
        }
        options.update(overrides)
        worker = IsolatedWorker(options.pop("module_path", step_module), **options)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


def assert_gone(pid: int) -> None:
    """``pid`` no longer runs (it may linger as a zombie of a reparenting init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return
    assert state in ("Z", "X"), f"process {pid} still running (state {state})"


def crash(worker: IsolatedWorker, function: str, timeout: float = 10.0) -> WorkerCrashed:
    old_pid = worker.pid
    with pytest.raises(WorkerCrashed) as caught:
        worker.call(function, {}, timeout)
    if old_pid is not None:  # else the call started (or restarted) the worker itself
        assert caught.value.pid == old_pid
    assert not worker.alive
    assert worker.pid is None
    return caught.value


def test_call_returns_the_json_result(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    worker.start()
    pid = worker.pid
    assert pid is not None
    assert pid != os.getpid()
    assert worker.alive
    result = worker.call("ok", {"sensor": "shelf-3", "values": [1.5, None, True]}, 5)
    assert result == {"pid": pid, "echo": {"sensor": "shelf-3", "values": [1.5, None, True]}}


def test_an_exception_in_the_step_is_not_a_crash(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    pid = worker.call("ok", {}, 5)["pid"]
    with pytest.raises(StepFailed) as caught:
        worker.call("boom", {"x": 42}, 5)
    error = caught.value
    assert (error.exc_type, error.exc_message, error.function) == (
        "ValueError",
        "bad reading 42",
        "boom",
    )
    assert "in boom" in error.traceback
    assert "ValueError: bad reading 42" in error.traceback
    assert not error.retryable
    assert worker.pid == pid
    assert worker.call("ok", {}, 5)["pid"] == pid
    assert worker.crashes == 0


def test_results_must_be_json_objects(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    with pytest.raises(StepFailed, match="must return a dict") as caught:
        worker.call("not_a_dict", {}, 5)
    assert caught.value.exc_type == "TypeError"
    with pytest.raises(StepFailed, match="not JSON"):
        worker.call("not_json", {}, 5)
    with pytest.raises(NotFoundError, match="no function 'nope'"):
        worker.call("nope", {}, 5)
    with pytest.raises(InvalidRequestError, match="not JSON-serializable"):
        worker.call("ok", {"when": object()}, 5)
    assert worker.crashes == 0
    assert worker.alive


def test_prints_do_not_corrupt_the_protocol(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    assert worker.call("chatty", {}, 5) == {"printed": True}
    error = crash(worker, "die")
    assert error.kind == "exit"
    assert error.returncode == 7
    assert "exited unexpectedly with code 7 during die" in str(error)
    # stdout and stderr of the step both end up in the tail kept for the crash report.
    assert "hello from the step" in error.stderr_tail
    assert "about to die" in error.stderr_tail


def test_memory_limit_kills_the_worker_and_the_next_call_gets_a_new_one(
    make_worker: WorkerFactory,
) -> None:
    worker = make_worker()
    old_pid = worker.call("ok", {}, 5)["pid"]
    error = crash(worker, "hog_memory")
    assert error.kind == "memory"
    assert error.retryable
    assert "memory limit of 128 MB" in str(error)
    assert "MemoryError" in error.stderr_tail
    assert_gone(old_pid)
    assert worker.crashes == 1
    assert worker.last_crash is error
    new_pid = worker.call("ok", {}, 5)["pid"]
    assert new_pid != old_pid
    assert worker.crashes == 0


def test_cpu_limit_kills_a_spinning_step(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    old_pid = worker.call("ok", {}, 5)["pid"]
    started = time.monotonic()
    error = crash(worker, "spin", timeout=20)
    # RLIMIT_CPU counts whole seconds: 1 s allowed means between 1 and 2 s of CPU.
    assert 0.9 < time.monotonic() - started < 10
    assert error.kind == "cpu"
    assert "CPU limit of 1 s" in str(error)
    assert "SIGXCPU" in str(error)
    assert worker.call("ok", {}, 5)["pid"] != old_pid


def test_cpu_limit_is_per_call_not_per_worker_lifetime(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    pid = worker.call("ok", {}, 5)["pid"]
    # 2.1 CPU seconds in all: past any lifetime limit of 1 s (2 s with rounding), yet each
    # call stays within its own second.
    for _ in range(3):
        assert worker.call("burn", {"seconds": 0.7}, 10)["pid"] == pid


def test_timeout_kills_the_worker(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    old_pid = worker.call("ok", {}, 5)["pid"]
    started = time.monotonic()
    error = crash(worker, "sleep", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert error.kind == "timeout"
    assert "longer than its 0.3 s timeout" in str(error)
    assert_gone(old_pid)
    assert worker.call("ok", {}, 5)["pid"] != old_pid


def test_a_kill_takes_what_the_step_spawned_with_it(
    make_worker: WorkerFactory, tmp_path: Path
) -> None:
    worker = make_worker()
    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(WorkerCrashed, match="timeout"):
        worker.call("spawn_and_sleep", {"pid_file": str(pid_file)}, 1.0)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while True:
        try:
            assert_gone(grandchild)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_a_worker_killed_while_idle_is_replaced_on_the_next_call(
    make_worker: WorkerFactory,
) -> None:
    slept: list[float] = []
    worker = make_worker(backoff=lambda attempt: 0.25 * attempt, sleep=slept.append)
    old_pid = worker.call("ok", {}, 5)["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.alive
    assert worker.call("ok", {}, 5)["pid"] != old_pid  # the step itself never failed
    assert slept == [0.25]
    assert worker.last_crash is not None
    assert worker.last_crash.kind == "signal"
    assert "killed by SIGKILL" in str(worker.last_crash)


def test_a_worker_that_cannot_be_spawned(make_worker: WorkerFactory, tmp_path: Path) -> None:
    worker = make_worker(python=str(tmp_path / "no-such-python"))
    with pytest.raises(WorkerCrashed, match="could not be started") as caught:
        worker.call("ok", {}, 5)
    assert caught.value.kind == "spawn"
    assert worker.crashes == 1


def test_segfault_is_a_crash(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    error = crash(worker, "segfault")
    assert error.kind == "signal"
    assert "killed by SIGSEGV" in str(error)
    assert worker.call("ok", {}, 5)["pid"]


def test_other_workers_are_unaffected(make_worker: WorkerFactory) -> None:
    victim, bystander = make_worker(name="victim"), make_worker(name="bystander")
    victim_pid = victim.call("ok", {}, 5)["pid"]
    before = bystander.call("ok", {"q": 1}, 5)
    crash(victim, "hog_memory")
    crash(victim, "sleep", timeout=0.2)
    assert bystander.alive
    assert bystander.call("ok", {"q": 1}, 5) == before
    assert bystander.crashes == 0
    assert victim.call("ok", {}, 5)["pid"] != victim_pid


def test_backoff_grows_between_consecutive_crashes_and_resets_after_success(
    make_worker: WorkerFactory,
) -> None:
    slept: list[float] = []
    worker = make_worker(backoff=lambda attempt: 0.1 * 2 ** (attempt - 1), sleep=slept.append)
    worker.start()
    for _ in range(3):
        crash(worker, "die")
    assert worker.crashes == 3
    # The first crash needed no restart before it; restarts 2 and 3 backed off, growing.
    assert slept == pytest.approx([0.1, 0.2])
    worker.call("ok", {}, 5)  # restart after crash 3, then a success resets the count
    assert slept == pytest.approx([0.1, 0.2, 0.4])
    assert worker.crashes == 0
    crash(worker, "die")
    worker.call("ok", {}, 5)
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.1])


def test_the_default_backoff_is_full_jitter_exponential(make_worker: WorkerFactory) -> None:
    slept: list[float] = []
    worker = make_worker(backoff=backoff_delay, sleep=slept.append)
    worker.start()
    crash(worker, "die")
    crash(worker, "die")
    worker.call("ok", {}, 5)
    assert len(slept) == 2
    assert 0 <= slept[0] <= 0.5
    assert 0 <= slept[1] <= 1.0


def test_stop_during_a_call_ends_it_without_counting_a_crash(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    worker.start()
    pid = worker.pid
    assert pid is not None
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.call("sleep", {}, 30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    worker.stop()
    thread.join(5)
    assert time.monotonic() - started < 3
    assert len(errors) == 1
    assert isinstance(errors[0], WorkerCrashed)
    assert errors[0].kind == "stopped"
    assert worker.crashes == 0
    assert not worker.alive
    assert_gone(pid)


def test_stop_restart_and_context_manager(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    with worker:
        first = worker.pid
        assert first is not None
        worker.restart()
        second = worker.pid
        assert second not in (None, first)
        assert_gone(first)
    assert worker.pid is None
    assert_gone(second)
    worker.stop()  # stopping a stopped worker is fine
    assert worker.call("ok", {}, 5)["pid"] not in (first, second)  # calls start it again


def test_a_module_that_does_not_import_is_a_step_failure(
    make_worker: WorkerFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import json\nvalue = 1 / 0\n")
    worker = make_worker(module_path=broken)
    with pytest.raises(StepFailed) as caught:
        worker.start()
    assert caught.value.exc_type == "ZeroDivisionError"
    assert "broken.py" in caught.value.traceback
    assert worker.pid is None


def test_a_module_can_import_its_siblings(make_worker: WorkerFactory, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (bundle / "agent.py").write_text(
        "from helpers import double\n\ndef sense(payload):\n    return {'y': double(payload['x'])}\n"
    )
    worker = make_worker(module_path=bundle / "agent.py")
    assert worker.call("sense", {"x": 21}, 5) == {"y": 42}


def test_limits_must_be_positive(step_module: Path) -> None:
    with pytest.raises(ValueError, match="memory_mb must be at least 1"):
        IsolatedWorker(step_module, memory_mb=0, cpu_seconds=1, name="x")
