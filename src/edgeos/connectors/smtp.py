"""The SMTP connector: an effect is one e-mail, sent through the binding's server.

The payload gives ``to`` (an address or a list; the operation's ``to`` when absent),
``subject`` and ``body`` (plain text). The ``Message-ID`` is derived from the effect's
idempotency key, and the key itself is sent as ``X-Idempotency-Key``: a redelivery sends
a message with the same Message-ID, which mail stores and receivers can drop as a
duplicate. SMTP has no way to ask the server whether it already took a message, so a
connection lost after the data was sent can deliver the mail twice; the Message-ID is
what makes that harmless.

How an answer is read (RFC 5321 section 4.2.1):

- **2xx** for the message: delivered. Recipients refused while others were accepted are
  listed in the result (``refused``): retrying would send the mail again to the others.
- **4xx** (a transient negative reply: greylisting, mailbox busy, server short of
  space): retryable.
- **5xx** (a permanent negative reply: unknown mailbox, relaying denied, message too
  big): not retryable.
- **no server** (refused, reset, timed out, closed in the middle): retryable; when the
  connection was lost while the message was being sent, ``maybe_applied`` too. A server
  that took the message and then failed to say goodbye (QUIT) has it: delivered.
- a server that cannot do STARTTLS when the binding asks for it, or whose certificate
  does not verify: not retryable, the binding needs fixing.

smtplib is blocking: each delivery runs in a worker thread on its own connection, so
deliveries do not wait for each other and an idle node keeps no connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import smtplib
import ssl
import time
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from typing import Any

from edgeos.connectors.base import DeliveryError, UnknownOperation
from edgeos.connectors.config import SmtpConnectorConfig, SmtpOperation, check_address
from edgeos.connectors.secret_refs import Resolved, resolve

#: Header that carries the effect's idempotency key as it is.
KEY_HEADER = "X-Idempotency-Key"
MAX_REPLY = 200


def message_id(key: str, sender: str) -> str:
    """The Message-ID of the e-mail of effect ``key``: the same for every delivery of it.

    A hash of the key (keys have ``:``, which a Message-ID may not), at the domain of
    the sender, as RFC 5322 section 3.6.4 asks for a globally unique id.
    """
    domain = email.utils.parseaddr(sender)[1].rpartition("@")[2] or "edgeos.invalid"
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"<{digest}.edgeos@{domain}>"


class SmtpConnector:
    """Sends one e-mail per effect through one SMTP server."""

    #: The Message-ID lets mail stores drop a repeat, but SMTP servers accept it again.
    idempotency_keys = False

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int = 25,
        sender: str,
        operations: Mapping[str, SmtpOperation],
        starttls: bool = False,
        timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        secrets: Callable[[str], str] | None = None,
    ) -> None:
        """``ssl_context`` is for STARTTLS; by default the system's trusted CAs. With
        ``username`` and ``password`` the connector logs in (AUTH); ``${secret:NAME}`` in
        either is filled by ``secrets(name)`` at each connection."""
        self.name = name
        self._login = (username, password) if username is not None else None
        self._secrets = secrets
        self.host = host
        self.port = port
        self.sender = sender
        self.operations = dict(operations)
        self.starttls = starttls
        self.timeout_s = timeout_s
        self._ssl_context = ssl_context

    @classmethod
    def from_config(
        cls, config: SmtpConnectorConfig, secrets: Callable[[str], str] | None = None
    ) -> SmtpConnector:
        """The connector for a validated binding."""
        return cls(
            config.name,
            username=config.username,
            password=config.password,
            secrets=secrets,
            host=config.host,
            port=config.port,
            sender=config.sender,
            operations=config.operations,
            starttls=config.starttls,
            timeout_s=config.timeout_s,
        )

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        """Send the e-mail of ``payload``; returns its Message-ID and recipients."""
        op = self.operations.get(operation)
        if op is None:
            raise UnknownOperation(self.name, operation, list(self.operations))
        message = self._message(operation, op, payload, key)
        login = None if self._login is None else tuple(
            resolve(part or "", self._secrets, binding=self.name, operation=operation,
                    what="the SMTP login")
            for part in self._login
        )  # fmt: skip
        refused = await asyncio.to_thread(self._send, operation, message, login)
        result: dict[str, Any] = {
            "message_id": message["Message-ID"],
            "to": message.get_all("To", []),
        }
        if refused:
            result["refused"] = {
                rcpt: f"{code} {_text(reply)}" for rcpt, (code, reply) in refused.items()
            }
        return result

    async def close(self) -> None:
        """Nothing to release: each delivery opens and closes its own connection."""

    # -- internals --------------------------------------------------------------------
    def _message(
        self, operation: str, op: SmtpOperation, payload: dict[str, Any], key: str
    ) -> EmailMessage:
        def refuse(problem: str) -> DeliveryError:
            return DeliveryError(self.name, operation, problem, retryable=False)

        if not isinstance(payload, dict):
            raise refuse("payload must be an object with to, subject and body")
        to = payload.get("to", op.to or None)
        if isinstance(to, str):
            to = [to]
        if not to or not isinstance(to, list) or not all(isinstance(a, str) for a in to):
            raise refuse("payload field 'to': required, an address or a list of addresses")
        for address in to:
            try:
                check_address(address)
            except ValueError as exc:
                raise refuse(f"payload field 'to': {exc}") from None
        subject, body = payload.get("subject"), payload.get("body")
        if not isinstance(subject, str):
            raise refuse("payload field 'subject': required, a string")
        if not isinstance(body, str):
            raise refuse("payload field 'body': required, a string")
        extra = set(payload) - {"to", "subject", "body"}
        if extra:
            raise refuse(f"payload field '{sorted(extra)[0]}': unknown (to, subject, body)")
        message = EmailMessage()
        try:
            message["From"] = self.sender
            message["To"] = ", ".join(to)
            message["Subject"] = subject  # a line break here raises: no header injection
        except ValueError as exc:
            raise refuse(f"payload field 'subject': {exc}") from None
        message["Date"] = email.utils.formatdate(time.time(), localtime=False, usegmt=True)
        message["Message-ID"] = message_id(key, self.sender)
        message[KEY_HEADER] = key
        message.set_content(body)
        return message

    def _send(
        self, operation: str, message: EmailMessage, login: tuple[Resolved, ...] | None = None
    ) -> dict[str, tuple[int, bytes]]:
        where = f"smtp://{self.host}:{self.port}"

        def fail(problem: str, *, retryable: bool, maybe_applied: bool = False) -> DeliveryError:
            # A server may echo what it was sent: no value of the login in the message.
            for part in login or ():
                problem = part.mask(problem)
            return DeliveryError(
                self.name, operation, f"{where}: {problem}",
                retryable=retryable, maybe_applied=maybe_applied,
            )  # fmt: skip

        sending = False
        try:
            client = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
            try:
                if self.starttls:
                    context = self._ssl_context or ssl.create_default_context()
                    client.starttls(context=context)
                if login is not None:
                    try:
                        client.login(login[0].text, login[1].text)
                    except smtplib.SMTPNotSupportedError:
                        raise fail("the server offers no login (AUTH) on this connection; "
                                   "drop username and password, or turn on starttls",
                                   retryable=False) from None  # fmt: skip
                sending = True
                refused = client.send_message(message)
            finally:
                _quit(client)
        except smtplib.SMTPAuthenticationError as exc:
            # 535 wrong credentials (a rotated secret fixes it: retryable); 534 and 538 ask
            # for another mechanism or for TLS, which no retry changes.
            code = exc.smtp_code
            answer = f"the login was refused: {code} {_text(exc.smtp_error)}"
            raise fail(answer, retryable=code in (454, 535)) from None
        except smtplib.SMTPRecipientsRefused as exc:
            # Every recipient was refused: retryable only if one of them was transient.
            replies = exc.recipients
            transient = any(400 <= code < 500 for code, _ in replies.values())
            listed = "; ".join(f"{r}: {c} {_text(m)}" for r, (c, m) in replies.items())
            raise fail(f"all recipients refused ({listed})", retryable=transient) from exc
        except smtplib.SMTPResponseException as exc:
            # Sender refused, data refused, HELO refused, or a 421 "closing": by the code.
            code = exc.smtp_code
            answer = f"answered {code} {_text(exc.smtp_error)}"
            raise fail(answer, retryable=not 500 <= code < 600) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise fail(f"STARTTLS is not offered by the server ({exc})", retryable=False) from exc
        except ssl.SSLCertVerificationError as exc:
            raise fail(
                f"the certificate does not verify: {exc.verify_message}", retryable=False
            ) from exc
        except (smtplib.SMTPException, OSError) as exc:
            # Refused, reset, timed out, disconnected: the server is down or went away. If
            # the data had been sent, the retry's Message-ID lets receivers drop the twin.
            what = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            detail = str(exc) or "no detail"
            raise fail(f"{what} ({detail})", retryable=True, maybe_applied=sending) from exc
        return refused


def _quit(client: smtplib.SMTP) -> None:
    """Say goodbye and close; a server that fails at QUIT already answered the message."""
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.quit()
    client.close()


def _text(reply: bytes | str) -> str:
    """A server's reply as short text for messages and results."""
    text = reply.decode("utf-8", errors="replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())[:MAX_REPLY]
