"""The supervisor's per-agent guards: model call rate and cost budgets.

One ``Supervisor`` per agent, shared by all its runs, so the limits in ``agent.yaml``
hold for the agent as a whole. It is called from step threads before every model call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edgeos.limits import CostBudget, RateLimited, TokenBucket

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest


class Supervisor:
    """Guards one agent's model calls: a token bucket and hourly and daily cost budgets."""

    def __init__(
        self, manifest: AgentManifest, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.manifest = manifest
        self._sleep = sleep
        budgets = manifest.budgets
        self.calls = TokenBucket(
            budgets.model_calls_per_minute, limit="model_calls_per_minute", owner=manifest.name
        )
        self.cost = CostBudget(budgets.cost_per_hour, budgets.cost_per_day, owner=manifest.name)

    def before_model_call(self, model: str, cost: float) -> float:
        """Wait for a token, then charge the call's cost; returns the seconds waited.

        The rate limit throttles (the step waits, bounded by its step timeout); the cost
        budget refuses, raising BudgetExceeded, which ends the run with an explicit event.
        """
        waited = 0.0
        while not self.calls.try_take():
            wait = self.calls.wait_time()
            if math.isinf(wait):
                raise RateLimited(
                    f"agent '{self.manifest.name}': model_calls_per_minute allows no call",
                    limit="model_calls_per_minute",
                )
            self._sleep(wait)
            waited += wait
        self.cost.charge(cost)
        return waited
