"""The SMTP connector against a real SMTP server on loopback (aiosmtpd's Controller).

The server stores each message once per Message-ID, like a mail store that drops
duplicates, and answers by recipient so tests can ask for a reply: ``full@`` gets 452
(transient), ``nobody@`` gets 550 (permanent).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import socket
import ssl
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from edgeos.connectors import (
    Connector,
    DeliveryError,
    DeliveryWorker,
    SmtpConnectorConfig,
    UnknownOperation,
    build,
    load_connectors,
    parse_connectors,
)
from edgeos.connectors.smtp import KEY_HEADER, SmtpConnector, message_id
from edgeos.errors import ManifestError
from edgeos.state import Database, outbox
from edgeos.state.outbox import OutboxEntry
from tests.test_connectors import closed_port, failure, opened, run

SENDER = "Edge 42 <edge-42@shop.example>"


class MailStore:
    """An aiosmtpd handler: keeps each message once per Message-ID."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[EmailMessage] = []
        self.stored: dict[str, EmailMessage] = {}
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.startswith("full@"):
            return "452 4.2.2 Mailbox full, try again later"
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.received.append(message)
            self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
            self.stored.setdefault(str(message["Message-ID"]), message)
        return "250 Message accepted for delivery"


@pytest.fixture
def mail() -> Iterator[tuple[MailStore, int]]:
    store = MailStore()
    port = closed_port()
    controller = Controller(store, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield store, port
    finally:
        controller.stop()


def binding(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "smtp",
        "host": "127.0.0.1",
        "port": port,
        "from": SENDER,
        "timeout_s": 5,
        "operations": {"send": {}, "alert": {"to": ["ops@shop.example"]}},
        **extra,
    }


def make(port: int, **extra: Any) -> Connector:
    return build(parse_connectors({"mail": binding(port, **extra)}, "test")["mail"])


def note(to: Any = "buyer@supplier.example", **extra: Any) -> dict[str, Any]:
    return {"to": to, "subject": "Reorder A-1", "body": "Please send 3 of A-1.\n", **extra}


def test_sends_one_mail_with_the_key_in_its_headers(mail: tuple[MailStore, int]) -> None:
    store, port = mail

    async def go() -> dict[str, Any] | None:
        async with opened(make(port)) as connector:
            assert isinstance(connector, Connector)
            assert connector.name == "mail"
            return await connector.deliver("send", note(), "run1:0:0")

    result = run(go())
    expected_id = message_id("run1:0:0", SENDER)
    assert result == {"message_id": expected_id, "to": ["buyer@supplier.example"]}
    (received,) = store.received
    assert received["Message-ID"] == expected_id
    assert expected_id.endswith("@shop.example>")  # at the sender's domain
    assert received[KEY_HEADER] == "run1:0:0"
    assert received["From"] == SENDER
    assert received["To"] == "buyer@supplier.example"
    assert received["Subject"] == "Reorder A-1"
    assert received["Date"]
    assert received.get_content().replace("\r\n", "\n") == "Please send 3 of A-1.\n"
    assert store.envelopes == [("edge-42@shop.example", ["buyer@supplier.example"])]


def test_redelivery_has_the_same_message_id_so_the_store_keeps_one(
    mail: tuple[MailStore, int],
) -> None:
    store, port = mail

    async def go() -> None:
        async with opened(make(port)) as connector:
            for _ in range(3):
                await connector.deliver("send", note(), "run1:0:0")
            await connector.deliver("send", note(), "run1:0:1")

    run(go())
    assert len(store.received) == 4  # SMTP cannot refuse a repeat ...
    assert len(store.stored) == 2  # ... the Message-ID lets the receiver drop it


def test_recipients_from_the_operation_and_lists(mail: tuple[MailStore, int]) -> None:
    store, port = mail

    async def go() -> list[dict[str, Any] | None]:
        async with opened(make(port)) as connector:
            payload = note()
            del payload["to"]
            return [
                await connector.deliver("alert", payload, "k1"),
                await connector.deliver("send", note(["a@x.example", "B <b@y.example>"]), "k2"),
            ]

    first, second = run(go())
    assert first is not None
    assert first["to"] == ["ops@shop.example"]
    assert second is not None
    assert second["to"] == ["a@x.example, B <b@y.example>"]
    assert [rcpt for _, rcpt in store.envelopes] == [
        ["ops@shop.example"],
        ["a@x.example", "b@y.example"],
    ]


def test_server_down_is_retryable() -> None:
    async def go() -> Any:
        async with opened(make(closed_port())) as connector:
            return await failure(connector, "send", note(), "run1:0:0")

    error = run(go())
    assert error.retryable
    assert not error.maybe_applied  # nothing was sent
    assert error.retry_after is None
    assert "connector 'mail' operation 'send'" in str(error)
    assert "ConnectionRefusedError" in str(error)


def test_550_is_permanent_and_452_is_retryable(mail: tuple[MailStore, int]) -> None:
    store, port = mail

    async def go() -> list[Any]:
        async with opened(make(port)) as connector:
            refused = await failure(connector, "send", note("nobody@shop.example"), "k1")
            full = await failure(connector, "send", note("full@shop.example"), "k2")
            # Some refused, some taken: delivered (a retry would mail the others again).
            partly = await connector.deliver(
                "send", note(["nobody@shop.example", "buyer@supplier.example"]), "k3"
            )
            return [refused, full, partly]

    refused, full, partly = run(go())
    assert not refused.retryable
    assert "550" in str(refused)
    assert "No such user" in str(refused)
    assert full.retryable
    assert "452" in str(full)
    assert partly["refused"] == {"nobody@shop.example": "550 5.1.1 No such user here"}
    assert [rcpt for _, rcpt in store.envelopes] == [["buyer@supplier.example"]]


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"subject": "s", "body": "b"}, "payload field 'to': required"),
        (note("not an address"), "payload field 'to': 'not an address' is not an e-mail"),
        (note("a@b.example\nBcc: all@x.example"), "payload field 'to'"),
        (note(subject="a\r\nBcc: all@x.example"), "payload field 'subject'"),
        (note(subject=None), "payload field 'subject': required"),
        (note(body=3), "payload field 'body': required"),
        (note(cc="x@y.example"), "payload field 'cc': unknown"),
    ],
)
def test_bad_payloads_are_permanent_and_send_nothing(
    mail: tuple[MailStore, int], payload: dict[str, Any], problem: str
) -> None:
    store, port = mail

    async def go() -> Any:
        async with opened(make(port)) as connector:
            return await failure(connector, "send", payload, "k")

    error = run(go())
    assert not error.retryable
    assert problem in str(error)
    assert store.received == []


def test_unknown_operation_and_close(mail: tuple[MailStore, int]) -> None:
    _, port = mail

    async def go() -> Any:
        connector = make(port)
        await connector.close()
        error = await failure(connector, "fax", note(), "k")
        await connector.close()
        return error

    error = run(go())
    assert isinstance(error, UnknownOperation)
    assert "alert, send" in str(error)


def test_starttls_that_the_server_does_not_offer_is_permanent(
    mail: tuple[MailStore, int],
) -> None:
    store, port = mail

    async def go() -> Any:
        async with opened(make(port, starttls=True)) as connector:
            return await failure(connector, "send", note(), "k")

    error = run(go())
    assert not error.retryable
    assert "STARTTLS" in str(error)
    assert store.received == []


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_starttls_sends_encrypted_and_an_untrusted_certificate_is_permanent(
    tmp_path: Path,
) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    store = MailStore()
    port = closed_port()
    controller = Controller(
        store, hostname="127.0.0.1", port=port, tls_context=server_context, require_starttls=True
    )
    controller.start()
    config = parse_connectors({"mail": binding(port, starttls=True)}, "test")["mail"]
    assert isinstance(config, SmtpConnectorConfig)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def go() -> list[Any]:
        async with opened(make(port, starttls=True)) as untrusting:
            error = await failure(untrusting, "send", note(), "k1")
        connector = SmtpConnector(
            "mail", host="127.0.0.1", port=port, sender=SENDER,
            operations=config.operations, starttls=True, ssl_context=trusting,
        )  # fmt: skip
        async with opened(connector):
            return [error, await connector.deliver("send", note(), "k2")]

    try:
        error, result = run(go())
    finally:
        controller.stop()
    assert not error.retryable
    assert "certificate does not verify" in str(error)
    assert result["message_id"] == message_id("k2", SENDER)
    assert [m[KEY_HEADER] for m in store.received] == ["k2"]


def test_a_server_down_leaves_the_mail_in_the_outbox_until_it_is_back(
    db: Database, mail: tuple[MailStore, int]
) -> None:
    store, port = mail
    now = [1_700_000_000.0]
    with db.transaction() as conn:
        assert outbox.enqueue(
            conn, OutboxEntry("run1:0:0", "run1", "mail", "send", note()), at=now[0]
        )

    async def attempt(connector: Connector) -> int:
        worker = DeliveryWorker(
            db, {"mail": connector}, clock=lambda: now[0], base_delay=0.01, max_delay=0.05
        )
        async with opened(connector):
            return await worker.drain_once()

    assert run(attempt(make(closed_port()))) == 1
    pending = outbox.get(db, "run1:0:0")
    assert pending is not None
    assert pending.state == outbox.PENDING
    assert "connector 'mail' operation 'send'" in (pending.last_error or "")
    now[0] += 1
    assert run(attempt(make(port))) == 1
    delivered = outbox.get(db, "run1:0:0")
    assert delivered is not None
    assert delivered.state == outbox.DELIVERED
    assert [m[KEY_HEADER] for m in store.received] == ["run1:0:0"]


def test_a_good_smtp_binding_loads(tmp_path: Path) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(
        "mail:\n  type: smtp\n  host: relay.local\n  port: 587\n  from: edge@shop.example\n"
        "  starttls: true\n  operations:\n    send: {}\n"
    )
    config = load_connectors(path)["mail"]
    assert isinstance(config, SmtpConnectorConfig)
    assert (config.host, config.port, config.sender, config.starttls) == (
        "relay.local", 587, "edge@shop.example", True,
    )  # fmt: skip
    assert isinstance(build(config), SmtpConnector)


SMTP_BINDING = "mail:\n  type: smtp\n  host: relay.local\n"
SEND = "  operations:\n    send: {}\n"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (SMTP_BINDING + SEND, "mail.from", "required"),
        (SMTP_BINDING + "  from: nobody\n" + SEND, "mail.from", "'nobody' is not an e-mail address"),
        (SMTP_BINDING + "  from: a@b.example\n  port: 0\n" + SEND, "mail.port", "greater than or equal"),
        (SMTP_BINDING + "  from: a@b.example\n", "mail.operations", "required"),
        (SMTP_BINDING + "  from: a@b.example\n  operations:\n    send: {to: [x]}\n",
         "mail.operations.send.to", "'x' is not an e-mail address"),
        (SMTP_BINDING + "  from: a@b.example\n  username: u\n  password: pw\n" + SEND, "mail.password",
         "give the password as ${secret:NAME}"),
        (SMTP_BINDING + "  from: a@b.example\n  username: u\n" + SEND, "mail", "give both or neither"),
        ("mail:\n  type: smtp\n  from: a@b.example\n" + SEND, "mail.host", "required"),
    ],
)  # fmt: skip
def test_each_bad_smtp_field_is_refused_with_file_and_field(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_connectors(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert f"field '{field}'" in message
    assert reason in message


# -- a server that misbehaves at a given moment ----------------------------------------------
@contextlib.contextmanager
def scripted(after_data: str) -> Iterator[int]:
    """A bare SMTP server for one connection: after the message's data it either drops
    the connection without answering (``drop``) or accepts it and then answers QUIT with
    an error (``bad-quit``). Yields its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b"220 scripted ESMTP\r\n")
            f.flush()
            while line := f.readline():
                command = line[:4].upper()
                if command == b"DATA":
                    f.write(b"354 go ahead\r\n")
                    f.flush()
                    while f.readline() not in (b".\r\n", b""):
                        pass
                    if after_data == "drop":
                        return
                    f.write(b"250 queued as 42\r\n")
                elif command == b"QUIT":
                    f.write(b"500 confused\r\n")
                    f.flush()
                    return
                else:
                    f.write(b"250 ok\r\n")
                f.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        thread.join(5)
        server.close()


def test_a_connection_lost_after_the_data_may_have_delivered_the_mail() -> None:
    async def go() -> DeliveryError:
        with scripted("drop") as port:
            async with opened(make(port)) as connector:
                return await failure(connector, "send", note(), "run1:0:0")

    error = run(go())
    assert error.retryable
    assert error.maybe_applied


def test_a_server_that_fails_at_quit_after_taking_the_mail_has_delivered_it() -> None:
    async def go() -> Any:
        with scripted("bad-quit") as port:
            async with opened(make(port)) as connector:
                return await connector.deliver("send", note(), "run1:0:0")

    result = run(go())
    assert result["message_id"] == message_id("run1:0:0", SENDER)
