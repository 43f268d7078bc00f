"""The uvicorn HTTP protocol that hands the client certificate to the app.

uvicorn does not fill the ASGI TLS extension itself. :class:`ClientCertProtocol` reads
the peer certificate once per connection, after the handshake, and puts it into every
request's ``scope["extensions"]["tls"]``. Only the fleet server imports this module (it
imports uvicorn); everyone else goes through :func:`edgeos.security.tls.uvicorn_ssl_options`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeos.security.tls import tls_extension


class ClientCertProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI TLS extension in each request's scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Remember the connection's TLS details; the handshake is over by now."""
        super().connection_made(transport)
        self._tls = tls_extension(transport.get_extra_info("ssl_object"))

    def on_message_begin(self) -> None:
        """Start the request's scope as uvicorn does, then add the TLS extension."""
        super().on_message_begin()
        if self._tls is None:
            return
        extensions = dict(self.scope.get("extensions") or {})
        # A fresh copy per request: an app that edits its scope cannot affect the next one.
        tls: dict[object, object] = {}
        tls.update(self._tls)
        tls["client_cert_chain"] = list(self._tls["client_cert_chain"])
        extensions["tls"] = tls
        self.scope["extensions"] = extensions

    def shutdown(self) -> None:
        """At server shutdown, drop an idle keep-alive connection at once.

        uvicorn closes idle connections politely, and over TLS a close waits for the
        client's close_notify, up to 30 s from a client that is not reading (a device
        between syncs). Nothing is in flight on an idle connection, so aborting loses
        nothing; a connection with a request in flight still finishes it.
        """
        if self.cycle is None or self.cycle.response_complete:
            self.transport.abort()
        else:
            super().shutdown()
