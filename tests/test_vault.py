"""The credential vault: sealed at rest, scoped, expiring, never printed."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeos.connectors import Connector
from edgeos.connectors.vault import BindingSecrets, Redactor, SecretError, Vault, load_key
from edgeos.errors import ConfigError, NotFoundError
from edgeos.state import Database

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
