"""ctx.infer from a step in an isolated worker process: routed, journaled, privacy kept, deferred."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yaml

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor
from edgeos.demo.train import DemoModels
from edgeos.routing import deferral
from edgeos.routing.venues import Offer
from edgeos.state import Database, journal
from edgeos.state.writer import GroupWriter
from tests.routing_support import SMALL, XL, V2Server, demo_host, remote, router_of

STEP = """
import os

def decide(ctx, data):
    out = ctx.infer("stockout-risk-xl", {"features": [data["features"]]},
                    privacy=data["privacy"])
    return {"pid": os.getpid(), "scores": [float(v) for v in out["probabilities"][0]]}
"""


def test_an_isolated_step_routes_through_the_node(tmp_path: Path, demo_models: DemoModels) -> None:
    data_dir = tmp_path / "node"
    directory = tmp_path / "bundle"
    directory.mkdir()
    doc = {"name": "iso", "version": "1.0", "steps": ["decide"], "models": [SMALL],
           "retry": {"max_attempts": 1}, "routing": {"models": [XL]},
           "isolation": {"mode": "process", "memory_mb": 512, "cpu_seconds": 20}}  # fmt: skip
    (directory / "agent.yaml").write_text(yaml.safe_dump(doc))
    (directory / "agent.py").write_text(textwrap.dedent(STEP))
    with np.load(demo_models.eval_set) as data:
        rows = np.asarray(data["features"][:3], dtype=np.float32)
    xl = ort.InferenceSession(str(demo_models.models[XL]), providers=["CPUExecutionProvider"])
    with Database(data_dir / "node.db") as db, Database(tmp_path / "venue" / "node.db") as vdb:
        host = demo_host(db, data_dir, demo_models, (SMALL,))
        venue_host = demo_host(vdb, tmp_path / "venue", demo_models, (XL,))
        server = V2Server(venue_host).start()
        router = router_of(host, remote("cloud", server.url, price=0.0004,
                                        models={XL: Offer(XL, 0.93)}))  # fmt: skip
        manage.add_agent(db, directory, data_dir / "agents", models=[SMALL], connectors=[])

        async def go() -> tuple[list[str], str]:
            writer = GroupWriter(db).start()
            executor = Executor(db, writer, host=host, scan_interval=0.05)
            executor.router = router
            await executor.start()
            try:
                shared = [
                    await executor.submit("iso", data={"features": r.tolist(), "privacy": "public"})
                    for r in rows
                ]
                private = await executor.submit(
                    "iso", data={"features": rows[0].tolist(), "privacy": "local-only"}
                )
                for run_id in [*shared, private]:
                    await executor.wait(run_id)
                # The link drops: the worker's call is deferred and the run parks, durably.
                server.stop()
                parked = await executor.submit(
                    "iso", data={"features": rows[0].tolist(), "privacy": "public"}
                )
                assert (await executor.wait(parked)).state == "waiting_venue"
                [waiting] = deferral.queue(db)
                assert (waiting.run_id, waiting.awaiting) == (parked, ["cloud"])
                return shared, private
            finally:
                await executor.stop()
                writer.stop()

        try:
            shared, private = asyncio.run(go())
        finally:
            router.close()
            server.stop()
            venue_host.close()
            host.close()
        for run_id, row in zip(shared, rows, strict=True):
            run = store.run(db, run_id)
            assert run.state == "succeeded", run.error
            assert run.outcome["pid"] != os.getpid()  # the step ran in the worker
            np.testing.assert_allclose(
                run.outcome["scores"], xl.run(None, {"features": row.reshape(1, -1)})[0][0],
                rtol=1e-5,
            )  # fmt: skip
            assert run.cost == 0.0004
            [decision] = [r.payload for r in journal.for_run(db, run_id)
                          if r.kind == "venue_decided"]  # fmt: skip
            assert decision["venue"] == "cloud"
            assert decision["privacy"] == "public"
        # local-only data asked of a model only the cloud has: refused in the node, never sent.
        run = store.run(db, private)
        assert run.state == "failed"
        assert "privacy local-only" in (run.error or "")
        assert server.requests == len(rows)
