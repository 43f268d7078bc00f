"""Hybrid edge-cloud execution: venues, the link monitor, the venue decision, cost accounts.

``ctx.infer(model, inputs, privacy=..., slo_ms=..., min_quality=..., cascade=...)`` asks
the node's :class:`~edgeos.routing.router.Router` where to run a call; see
``docs/routing.md``. Modules: ``venues`` (the Venue protocol and the local host),
``v2_venue`` (any Open Inference Protocol endpoint, and the fleet's cloud venue),
``config`` (``venues.yaml``), ``monitor`` (links), ``decide`` (the decision, offline
fallback and deferral), ``router`` (decide, call, measure, account), ``build`` (the
node's router), ``deferral`` (calls waiting for an offline venue, in the node database),
``outbound`` (messages for cloud services, queued on disk), ``stats`` (cost per decision
from the journal).
"""
