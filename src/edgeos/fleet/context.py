"""What every request handler of one fleet app shares: settings, database, CA, TUF.

One ``FleetContext`` is built by the app factory and kept on ``app.state.fleet``; the
handlers and the auth checks reach it through the request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from edgeos.fleet.db import FleetDatabase
from edgeos.fleet.settings import FleetConfig

if TYPE_CHECKING:
    from edgeos.fleet.tuf_repo import TufRepository
    from edgeos.security.certs import CertificateAuthority, DeviceCertificate


class CertificateCache:
    """Device certificates already verified against the CA, by PEM text.

    Checking the CA's signature costs more than the rest of a sync; a device presents the
    same certificate on every request until it renews, so the result is kept. The
    revocation and validity checks still run on every request: only the signature check
    is cached, and a signature does not change.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, DeviceCertificate] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pem: str) -> DeviceCertificate | None:
        """The verified certificate for ``pem``, if it was verified before."""
        with self._lock:
            found = self._items.get(pem)
            if found is not None:
                self._items.move_to_end(pem)
            return found

    def put(self, pem: str, cert: DeviceCertificate) -> None:
        """Remember a verified certificate, forgetting the least recently used past capacity."""
        with self._lock:
            self._items[pem] = cert
            self._items.move_to_end(pem)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


@dataclass
class FleetContext:
    """One fleet app's shared parts."""

    config: FleetConfig
    db: FleetDatabase
    ca: CertificateAuthority
    #: The TUF repository: it keeps its state in the database, so one serves every thread.
    tuf: TufRepository
    certificates: CertificateCache = field(default_factory=CertificateCache)

    @property
    def ca_pem(self) -> str:
        """The CA certificate, PEM."""
        return str(self.ca.cert_pem)

    @property
    def pin(self) -> str:
        """The CA's pin, the second half of every token this fleet hands out."""
        return str(self.ca.pin)


def fleet_context(request: Request) -> FleetContext:
    """The context of the app serving ``request``."""
    ctx: FleetContext = request.app.state.fleet
    return ctx
