"""The child side of :class:`edgeos.agents.isolation.IsolatedWorker`.

Run as ``python -P _worker.py MODULE_PATH MEMORY_MB CPU_SECONDS`` (0: no limit). It
imports nothing but the standard library — not even edgeos — so the interpreter is small
when the memory limit is set and the agent's own imports are what count against it.

Protocol: one JSON object per line. The parent writes ``{"function": f, "payload": {...}}``
on the child's stdin; the child answers on its original stdout with exactly one of

- ``{"ready": pid}`` once, after the limits are set and the module is imported;
- ``{"ok": result}`` when ``module.f(payload)`` returned a JSON object;
- ``{"error": {"type", "message", "traceback"}}`` when it raised (or returned no JSON
  object); a failed import is reported the same way instead of ``ready``;
- ``{"missing": f}`` when the module has no callable ``f``.

The child exits 0 when its stdin closes (the parent stopped it, or died), and
:data:`EXIT_MEMORY` after a ``MemoryError``: an interpreter that ran out of memory may be
in any state, so it is not trusted with another step.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import IO, Any

#: Exit status after a MemoryError (the memory limit, as far as the parent can tell).
EXIT_MEMORY = 3
#: Exit status after a malformed request or bad arguments: a bug in edgeos, not the agent.
EXIT_PROTOCOL = 4
#: Exit status after the step module failed to import (the error was sent first).
EXIT_IMPORT = 5

_MIB = 1024 * 1024


def _cap(value: int, hard: int) -> int:
    """``value``, lowered to an inherited hard limit (an unprivileged process cannot raise it)."""
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def limit_memory(memory_mb: int) -> None:
    """Cap the address space; soft == hard so step code cannot lift it."""
    if memory_mb > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _cap(memory_mb * _MIB, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def arm_cpu(cpu_seconds: int) -> None:
    """Allow the next step ``cpu_seconds`` more CPU seconds (at least; RLIMIT_CPU counts whole
    seconds of the process's lifetime, so the soft limit is re-armed before every step).

    The hard limit is left alone: once lowered it could never be raised for the next step.
    Past the soft limit the kernel sends SIGXCPU, whose default action ends the process.
    """
    if cpu_seconds > 0:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = usage.ru_utime + usage.ru_stime
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (_cap(math.ceil(used + cpu_seconds), hard), hard))


def _load(path: Path) -> ModuleType:
    # The module's directory goes first on sys.path so it can import its sibling files.
    sys.path.insert(0, str(path.parent))
    name = path.stem if path.stem not in sys.modules else f"edgeos_step_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as a normal import does (dataclasses look it up).
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
        }
    }


def _send(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def _run(module: ModuleType, request: dict[str, Any], cpu_seconds: int) -> dict[str, Any]:
    name = request["function"]
    function = getattr(module, name, None) if isinstance(name, str) else None
    if not callable(function):
        return {"missing": name}
    arm_cpu(cpu_seconds)
    try:
        result = function(request["payload"])
    except MemoryError:
        raise  # not the step's error to report: the process is spent (see main)
    except Exception as exc:
        return _error(exc)
    if not isinstance(result, dict):
        problem = TypeError(
            f"{name} must return a dict (a JSON object), got {type(result).__name__}"
        )
        return _error(problem)
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        return _error(TypeError(f"{name} returned a dict that is not JSON: {exc}"))
    return {"ok": result}


def serve(module_path: Path, memory_mb: int, cpu_seconds: int) -> int:
    """Set the limits, import the module, answer requests until stdin closes."""
    limit_memory(memory_mb)
    # Crashes by signal (SIGXCPU, SIGSEGV) would otherwise leave core files behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    # Keep private copies of the protocol pipes, then point fds 0 and 1 elsewhere: a step
    # that prints (or reads stdin) must not corrupt the conversation with the parent.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)

    try:
        module = _load(module_path)
    except MemoryError:
        raise
    except BaseException as exc:  # SyntaxError, SystemExit in module code, ...
        _send(replies, _error(exc))
        return EXIT_IMPORT
    _send(replies, {"ready": os.getpid()})

    for line in requests:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or "function" not in request:
                raise ValueError("not a request object")
        except ValueError as exc:
            print(f"edgeos worker: bad request from the parent: {exc}", file=sys.stderr)
            return EXIT_PROTOCOL
        _send(replies, _run(module, request, cpu_seconds))
    return 0


def main(argv: list[str]) -> int:
    """Entry point: ``MODULE_PATH MEMORY_MB CPU_SECONDS``."""
    try:
        module_path, memory_mb, cpu_seconds = Path(argv[0]), int(argv[1]), int(argv[2])
    except (IndexError, ValueError):
        print("usage: _worker.py MODULE_PATH MEMORY_MB CPU_SECONDS", file=sys.stderr)
        return EXIT_PROTOCOL
    try:
        return serve(module_path, memory_mb, cpu_seconds)
    except MemoryError:
        # os.write and os._exit allocate (almost) nothing, unlike print and sys.exit.
        os.write(2, b"edgeos worker: MemoryError (memory limit reached)\n")
        os._exit(EXIT_MEMORY)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
