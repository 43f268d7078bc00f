"""The credential vault: sealed at rest, scoped, expiring, never printed."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from edgeos.connectors import Connector
from edgeos.connectors.vault import BindingSecrets, Redactor, SecretError, Vault, load_key
from edgeos.errors import ConfigError, ManifestError, NotFoundError
from edgeos.state import Database
from tests.test_connectors import pg_schema as pg_schema  # a fixture

TOKEN = "sk-live-9f8e7d6c5b4a"


@pytest.fixture
def vault(db: Database) -> Vault:
    return Vault(db, load_key(db.path.parent))


def test_secrets_are_sealed_at_rest_and_scoped(vault: Vault, db: Database) -> None:
    info = vault.set("supplier_token", TOKEN, scopes=["supplier"])
    assert (info.version, info.scopes) == (1, ["supplier"])
    assert vault.get("supplier_token", scope="supplier") == TOKEN
    with pytest.raises(SecretError, match="not granted to scope 'messaging'"):
        vault.get("supplier_token", scope="messaging")
    db.checkpoint()
    for path in db.path.parent.glob("node.db*"):
        assert TOKEN.encode() not in path.read_bytes()
    key = db.path.parent / "keys" / "vault.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_rotation_expiry_and_removal(vault: Vault) -> None:
    vault.set("t", "first-value", scopes=["a"], expires_at=1000.0)
    with pytest.raises(SecretError, match="expired"):
        vault.get("t", scope="a", now=1000.0)
    assert vault.get("t", scope="a", now=999.0) == "first-value"
    info = vault.rotate("t", "second-value")
    assert (info.version, info.scopes, info.expires_at) == (2, ["a"], 1000.0)
    assert vault.get("t", scope="a", now=1.0) == "second-value"
    assert [s.name for s in vault.entries()] == ["t"]
    vault.remove("t")
    with pytest.raises(NotFoundError):
        vault.remove("t")
    with pytest.raises(SecretError, match="not in this node's vault"):
        vault.get("t", scope="a")


def test_a_tampered_or_swapped_row_does_not_decrypt(vault: Vault, db: Database) -> None:
    vault.set("a", "value-of-a", scopes=["x"])
    vault.set("b", "value-of-b", scopes=["x"])
    raw = sqlite3.connect(db.path)
    nonce, sealed = raw.execute("SELECT nonce, ciphertext FROM secrets WHERE name = 'a'").fetchone()
    raw.execute("UPDATE secrets SET nonce = ?, ciphertext = ? WHERE name = 'b'", (nonce, sealed))
    raw.commit()
    raw.close()
    with pytest.raises(SecretError, match="does not decrypt"):
        vault.get("b", scope="x")


def test_another_key_cannot_read_the_vault(vault: Vault, db: Database) -> None:
    vault.set("a", "value-of-a", scopes=["x"])
    with pytest.raises(SecretError, match="does not decrypt"):
        Vault(db, b"\x01" * 32).get("a", scope="x")


def test_bad_input_changes_nothing(vault: Vault) -> None:
    with pytest.raises(ConfigError, match="secret name"):
        vault.set("bad name!", "v" * 8)
    with pytest.raises(ConfigError, match="value is empty"):
        vault.set("ok", "")
    assert vault.entries() == []


def test_redactor_hides_every_value(vault: Vault) -> None:
    vault.set("a", TOKEN, scopes=["x"])
    vault.set("b", "hunter2-pass", scopes=["x"])
    redact = Redactor(vault.values())
    text = f"POST failed: Authorization: Bearer {TOKEN}; password=hunter2-pass"
    assert redact(text) == "POST failed: Authorization: Bearer ***; password=***"
    assert Redactor([])("nothing") == "nothing"


def test_cli_never_prints_values(tmp_path: Path) -> None:
    env = {"EDGEOS_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}

    def edgeos(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgeos", "secrets", *args],
            input=stdin, capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip

    stored = edgeos("set", "supplier_token", "--scope", "supplier", "--expires", "30d", stdin=TOKEN)
    assert stored.returncode == 0, stored.stderr
    assert "version 1" in stored.stdout
    listing = edgeos("list")
    assert "supplier_token" in listing.stdout
    assert TOKEN not in listing.stdout + listing.stderr + stored.stdout
    assert "version 2" in edgeos("rotate", "supplier_token", stdin="sk-live-new-0001").stdout
    bad = edgeos("set", "x", "--scope", "s", "--expires", "soon", stdin="abcdef")
    assert bad.returncode == 1
    assert "--expires" in bad.stderr
    assert "removed" in edgeos("remove", "supplier_token").stdout


def test_http_headers_take_secrets_from_the_vault_at_each_request(vault: Vault) -> None:
    import asyncio

    from edgeos.connectors.base import DeliveryError
    from edgeos.connectors.config import HttpOperation
    from edgeos.connectors.http import HttpConnector
    from tests.test_connectors import Receiver

    vault.set("supplier_token", TOKEN, scopes=["supplier"])
    receiver = Receiver()

    def connector(name: str) -> HttpConnector:
        return HttpConnector(
            name, base_url=receiver.url,
            operations={"reorder": HttpOperation(method="POST", path="/orders")},
            headers={"Authorization": "Bearer ${secret:supplier_token}", "X-Store": "42"},
            secrets=BindingSecrets(lambda secret, scope: vault.get(secret, scope=scope),
                                   name, [name]),
        )  # fmt: skip

    async def go() -> None:
        ok = connector("supplier")
        await ok.deliver("reorder", {"sku": "A", "qty": 1}, "k1")
        vault.rotate("supplier_token", "sk-live-rotated-02")
        await ok.deliver("reorder", {"sku": "B", "qty": 1}, "k2")
        await ok.close()
        other = connector("messaging")  # not granted
        with pytest.raises(DeliveryError, match="not granted to binding 'messaging'") as info:
            await other.deliver("reorder", {"sku": "C", "qty": 1}, "k3")
        assert info.value.retryable
        assert TOKEN not in str(info.value)
        await other.close()

    try:
        asyncio.run(go())
    finally:
        receiver.stop()
    auth = [r.headers.get("Authorization") for r in receiver.requests]
    assert auth == [f"Bearer {TOKEN}", "Bearer sk-live-rotated-02"]
    assert all(r.headers.get("X-Store") == "42" for r in receiver.requests)


def test_scopes_are_checked_when_a_secret_is_set(vault: Vault) -> None:
    with pytest.raises(ConfigError, match="scope 'bad scope'"):
        vault.set("t", "value-1234", scopes=["bad scope"])
    with pytest.raises(ConfigError, match="at least one scope"):
        vault.set("t", "value-1234", scopes=[])
    assert vault.entries() == []
    info = vault.set("t", "value-1234", scopes=["supplier.write", "orders:write", "orders:write"])
    assert info.scopes == ["orders:write", "supplier.write"]


def test_a_connector_sees_only_the_secrets_its_binding_is_granted(vault: Vault) -> None:
    import asyncio

    from edgeos.connectors import DeliveryError, build, parse_connectors
    from tests.test_connectors import Receiver

    vault.set("by_name", "sk-by-name-0001", scopes=["supplier"])  # granted the old way
    vault.set("by_scope", "sk-by-scope-0002", scopes=["orders.write"])
    vault.set("elsewhere", "sk-elsewhere-0003", scopes=["payroll.read"])
    receiver = Receiver()

    def connector(name: str, header: str, scopes: list[str]) -> Connector:
        body = {
            "type": "http", "base_url": receiver.url, "scopes": scopes,
            "headers": {"Authorization": f"Bearer ${{secret:{header}}}"},
            "operations": {"reorder": {"method": "POST", "path": "/orders"}},
        }  # fmt: skip
        config = parse_connectors({name: body}, "connectors.yaml")[name]
        return build(config, lambda secret, scope: vault.get(secret, scope=scope))

    async def go() -> list[str]:
        refusals = []
        for key, (name, header, scopes) in enumerate(
            [
                ("supplier", "by_name", []),
                ("supplier", "by_scope", ["orders.write"]),
                ("other", "by_scope", ["orders.write"]),
                ("supplier", "elsewhere", ["orders.write"]),
                ("other", "by_name", ["orders.write"]),
            ]
        ):
            c = connector(name, header, scopes)
            try:
                await c.deliver("reorder", {"sku": "A", "qty": 1}, f"k{key}")
            except DeliveryError as exc:
                refusals.append(str(exc))
            finally:
                await c.close()
        return refusals

    try:
        refusals = asyncio.run(go())
    finally:
        receiver.stop()
    assert [r.headers.get("Authorization") for r in receiver.requests] == [
        "Bearer sk-by-name-0001", "Bearer sk-by-scope-0002", "Bearer sk-by-scope-0002",
    ]  # fmt: skip
    assert refusals == [
        "connector 'supplier' operation 'reorder': secret 'elsewhere' is not granted to "
        "binding 'supplier' (its scopes: supplier, orders.write); grant it with edgeos "
        "secrets set elsewhere --scope ...",
        "connector 'other' operation 'reorder': secret 'by_name' is not granted to binding "
        "'other' (its scopes: other, orders.write); grant it with edgeos secrets set by_name "
        "--scope ...",
    ]


# -- secrets beyond HTTP headers: resolved when connecting, never shown ----------------------


def _lookup(vault: Vault) -> Callable[[str, str], str]:
    return lambda secret, scope: vault.get(secret, scope=scope)


def test_secret_references_are_checked_where_they_are_written() -> None:
    from edgeos.connectors import parse_connectors

    def refused(body: dict[str, Any], field: str, reason: str) -> None:
        with pytest.raises(ManifestError) as info:
            parse_connectors({"b": body}, "connectors.yaml")
        assert f"field 'b{field}'" in str(info.value)
        assert reason in str(info.value)

    ops = {"operations": {"run": {"statement": "SELECT 1"}}}
    refused({"type": "sql", "url": "postgresql://u:${secret:pg pass}@h/db", **ops}, ".url",
            "is not a secret reference")  # fmt: skip
    refused({"type": "sql", "url": "sqlite:///${secret:path}", **ops}, ".url",
            "an SQLite path is not a secret")  # fmt: skip
    refused({"type": "mqtt", "url": "mqtt://u:${secret:p w}@h", "subscribe": {"r": {"topic": "t"}}},
            ".url", "is not a secret reference")  # fmt: skip
    refused({"type": "http", "base_url": "http://h", "headers": {"A": "${secret:}"},
             "operations": {"o": {"method": "POST", "path": "/"}}}, ".headers",
            "is not a secret reference")  # fmt: skip


def test_a_postgresql_url_takes_its_user_and_password_from_the_vault(
    vault: Vault,
    pg_schema: tuple[str, str],
) -> None:
    import psycopg

    from edgeos.connectors import DeliveryError, build, parse_connectors
    from tests.test_connectors import closed_port, failure, opened, run

    schema, url = pg_schema
    role, password = f"edgeos_{schema[-12:]}", "p@ss/w:rd%41-" + schema[-6:]
    admin = os.environ["EDGEOS_TEST_POSTGRES_URL"]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f'GRANT ALL ON SCHEMA "{schema}" TO {role}')
        conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
        conn.execute(f'CREATE TABLE "{schema}".who (name text)')
        conn.execute(f'GRANT ALL ON "{schema}".who TO {role}')
    vault.set("pg_user", role, scopes=["orders.write"])
    vault.set("pg_password", password, scopes=["orders.write"])
    rest = url.split("@", 1)[1]
    templated = f"postgresql://${{secret:pg_user}}:${{secret:pg_password}}@{rest}"
    body = {"type": "sql", "url": templated, "scopes": ["orders.write"],
            "operations": {"whoami": {"statement": "INSERT INTO who VALUES (current_user)"}}}  # fmt: skip

    def connector(url_text: str) -> Any:
        config = parse_connectors({"store": {**body, "url": url_text}}, "connectors.yaml")["store"]
        assert "p@ss" not in repr(config)  # the binding keeps the reference only
        return build(config, _lookup(vault))

    async def go() -> DeliveryError:
        async with opened(connector(templated)) as store:
            await store.deliver("whoami", {}, "k1")
        down = templated.replace(rest.split("/")[0], f"127.0.0.1:{closed_port()}")
        async with opened(connector(down)) as store:
            return await failure(store, "whoami", {}, "k2")

    try:
        refused = run(go())
        with psycopg.connect(admin, autocommit=True) as conn:
            who = conn.execute(f'SELECT name FROM "{schema}".who').fetchall()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role} CASCADE")
            conn.execute(f"DROP ROLE {role}")
    assert who == [(role,)]  # the URL was filled in (and the password quoted) when connecting
    assert refused.retryable
    assert "cannot connect to PostgreSQL" in str(refused)
    assert password not in str(refused)
    assert quote(password, safe="") not in str(refused)


def test_an_mqtt_url_takes_its_credentials_from_the_vault(vault: Vault) -> None:
    from edgeos.connectors import build, parse_connectors
    from tests.test_connectors import failure, opened, run

    broker = os.environ.get("EDGEOS_TEST_MQTT_URL")
    if not broker:
        pytest.skip("EDGEOS_TEST_MQTT_URL is not set: no MQTT broker to test against")
    host = broker.split("://", 1)[1]
    url = f"mqtt://${{secret:mqtt_user}}:${{secret:mqtt_password}}@{host}"
    body = {"type": "mqtt", "url": url, "operations": {"alarm": {"topic": "edgeos/test/alarm"}}}
    config = parse_connectors({"plant": body}, "connectors.yaml")["plant"]
    vault.set("mqtt_user", "edge-42", scopes=["plant"])

    async def go() -> Any:
        async with opened(build(config, _lookup(vault))) as plant:
            missing = await failure(plant, "alarm", {"level": 1}, "k1")
            vault.set("mqtt_password", "mqtt-pass-0042", scopes=["plant"])
            await plant.deliver("alarm", {"level": 1}, "k2")
            return missing

    missing = run(go())
    # The broker on loopback lets anyone in, so only the lookup can be shown failing here.
    assert missing.retryable
    assert "the broker URL: secret 'mqtt_password' is not in this node's vault" in str(missing)


def test_the_smtp_login_comes_from_the_vault_and_never_shows(vault: Vault) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    from edgeos.connectors import build, parse_connectors
    from tests.test_connectors import closed_port, failure, opened, run
    from tests.test_connectors_smtp import MailStore

    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:  # fmt: skip
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"smtp-pass-0042", handled=False)

    store, port = MailStore(), closed_port()
    # PLAIN only: a refused login then ends at once (the server's LOGIN waits for more).
    controller = Controller(store, hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False, auth_exclude_mechanism=["LOGIN"])  # fmt: skip
    controller.start()
    body = {"type": "smtp", "host": "127.0.0.1", "port": port, "from": "edge-42@shop.example",
            "username": "edge-42", "password": "${secret:smtp_password}", "scopes": ["mail.send"],
            "timeout_s": 5, "operations": {"send": {}}}  # fmt: skip
    config = parse_connectors({"mail": body}, "connectors.yaml")["mail"]
    note = {"to": "buyer@supplier.example", "subject": "Reorder", "body": "3 of A-1\n"}
    vault.set("smtp_password", "smtp-pass-0042", scopes=["mail.send"])

    async def go() -> Any:
        async with opened(build(config, _lookup(vault))) as mail:
            await mail.deliver("send", note, "k1")
            vault.rotate("smtp_password", "smtp-wrong-9999")
            return await failure(mail, "send", note, "k2")

    try:
        wrong = run(go())
    finally:
        controller.stop()
    assert logins == [(b"edge-42", b"smtp-pass-0042"), (b"edge-42", b"smtp-wrong-9999")]
    assert len(store.received) == 1
    assert wrong.retryable  # 535: a rotated password may fix it
    assert "the login was refused: 535" in str(wrong)
    assert "smtp-wrong-9999" not in str(wrong)
