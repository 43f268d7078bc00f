"""Dynamic micro-batching: concurrent calls to one model gathered into a single run.

Calls whose non-batch dimensions and requested outputs agree are concatenated along the
first axis, run once, and split back. Under load this turns many small runs into a few
larger ones, which is where CPU inference gains throughput.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from edgeos.manifests import BatchingSpec

    Arrays = Mapping[str, np.ndarray[Any, Any]]
    RunFn = Callable[[Arrays, Sequence[str]], list[np.ndarray[Any, Any]]]


@dataclass
class _Call:
    inputs: Arrays
    outputs: tuple[str, ...]
    rows: int
    future: asyncio.Future[list[np.ndarray[Any, Any]]] = field(repr=False)

    def key(self) -> tuple[object, ...]:
        shapes = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(self.inputs.items()))
        return (self.outputs, shapes)


class MicroBatcher:
    """Gathers calls for ``spec.max_queue_delay_ms`` or until ``spec.max_batch_size`` rows."""

    def __init__(self, run: RunFn, spec: BatchingSpec, executor: Executor | None) -> None:
        """``executor`` runs the batches; None runs them on the event loop (tiny models)."""
        self._run = run
        self._spec = spec
        self._executor = executor
        self._queue: asyncio.Queue[_Call] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._stragglers: set[asyncio.Task[None]] = set()

    async def submit(self, inputs: Arrays, outputs: Sequence[str]) -> list[np.ndarray[Any, Any]]:
        """Run one call as part of a batch; returns its own slice of the outputs."""
        rows = next(iter(inputs.values())).shape[0]
        if rows > self._spec.max_batch_size:
            return await self._call(inputs, outputs)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        future: asyncio.Future[list[np.ndarray[Any, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(_Call(inputs, tuple(outputs), rows, future))
        return await future

    async def close(self) -> None:
        """Stop the worker; calls still queued fail with UnavailableError-like cancellation."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
            self._queue = None

    async def _drain(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        delay = self._spec.max_queue_delay_ms / 1000
        while True:
            first = await queue.get()
            batch = [first]
            rows = first.rows
            deadline = loop.time() + delay
            while rows < self._spec.max_batch_size:
                if queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        call = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    call = queue.get_nowait()
                if call.key() != first.key() or rows + call.rows > self._spec.max_batch_size:
                    # Incompatible or too big: run it on its own, after this batch.
                    task = loop.create_task(self._run_batch([call]))
                    self._stragglers.add(task)
                    task.add_done_callback(self._stragglers.discard)
                    continue
                batch.append(call)
                rows += call.rows
            await self._run_batch(batch)

    async def _call(self, inputs: Arrays, outputs: Sequence[str]) -> list[np.ndarray[Any, Any]]:
        if self._executor is None:
            return self._run(inputs, outputs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, inputs, outputs)

    async def _run_batch(self, batch: list[_Call]) -> None:
        first = batch[0]
        if len(batch) == 1:
            joined: Arrays = first.inputs
        else:
            import numpy as np  # a batch of arrays exists, so numpy is loaded already

            joined = {
                name: np.concatenate([c.inputs[name] for c in batch]) for name in first.inputs
            }
        try:
            results = await self._call(joined, first.outputs)
        except Exception as exc:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        start = 0
        for call in batch:
            end = start + call.rows
            if not call.future.done():
                call.future.set_result([r[start:end] for r in results])
            start = end
