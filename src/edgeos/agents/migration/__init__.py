"""Moving a run between nodes in a signed envelope, and back, with one journal chain.

``seal`` takes a run out of the node it is on; ``accept`` checks an envelope and imports
the run so the destination's executor continues it at its next step, delivering the
effects it was handed with their keys; ``verify_run`` checks a run's chain across every
node it ran on. Handing a run back is the same two calls the other way; ``reclaim``
continues a run on its source when its envelope expired before any node accepted it.
"""

from edgeos.agents.migration.accept import Accepted, Trust, accept, parse
from edgeos.agents.migration.envelope import Signer
from edgeos.agents.migration.reclaim import reclaim
from edgeos.agents.migration.seal import seal
from edgeos.agents.migration.verify import RunVerification, verify_run
from edgeos.protocol.migration import Envelope

__all__ = [
    "Accepted",
    "Envelope",
    "RunVerification",
    "Signer",
    "Trust",
    "accept",
    "parse",
    "reclaim",
    "seal",
    "verify_run",
]
