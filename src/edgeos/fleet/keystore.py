"""The fleet's data directory: its keys, its database, its first admin token.

``init_fleet`` makes whatever is missing and leaves alone whatever exists, so
``edgeos fleet serve`` can call it at every start and a replica sharing the keys and the
database finds nothing to do. ``load_keys`` reads what a serving replica needs.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from edgeos.errors import ConfigError
from edgeos.fleet.db import FleetDatabase, write_audit
from edgeos.fleet.operators import create_operator_token, has_operator_tokens
from edgeos.fleet.settings import FleetConfig
from edgeos.fleet.tuf_keys import OnlineSigners, create_keys, load_online_keys, load_root_keys
from edgeos.fleet.tuf_repo import TufRepository, init_repository
from edgeos.fleet.tuf_store import SqlTufStore
from edgeos.security.certs import CertificateAuthority
from edgeos.security.keys import (
    generate_key,
    load_private_key,
    write_private_key,
    write_public_file,
)

# A server certificate this close to its end is replaced at start-up.
_SERVER_RENEW_BEFORE_S = 30 * 86400.0


@dataclass(frozen=True)
class FleetKeys:
    """What a serving replica reads from ``DATA/keys``."""

    ca: CertificateAuthority
    online: OnlineSigners


@dataclass(frozen=True)
class InitReport:
    """What ``init_fleet`` made; ``admin_token`` is set only when it made the first one."""

    created: tuple[str, ...]
    admin_token: str | None


def _ca_paths(config: FleetConfig) -> tuple[Path, Path]:
    return config.keys_dir / "ca.key", config.keys_dir / "ca.crt"


def init_fleet(config: FleetConfig, *, root_keys: int = 1, threshold: int = 1) -> InitReport:
    """Create the CA, the server certificate, the TUF keys and repository, the schema and
    the first admin token, each only if missing. Root keys go to ``DATA/root-keys``.

    A database that holds a fleet already needs that fleet's keys: a data directory
    without them is refused (ConfigError) rather than given keys nobody trusts.
    """
    created: list[str] = []
    db = FleetDatabase(config.database_url)
    try:
        db.migrate()
        store = SqlTufStore(db.engine)
        existing_fleet = store.latest("root") is not None
        ca = _ensure_ca(config, created, existing_fleet=existing_fleet)
        if ensure_server_certificate(config, ca):
            created.append(f"server certificate {config.keys_dir / 'server.crt'}")
        fresh_keys = None
        if not (config.keys_dir / "tuf").exists():
            fresh_keys = create_keys(
                config.keys_dir, config.root_keys_dir, root_keys=root_keys, threshold=threshold
            )
            created.append(f"TUF keys {config.keys_dir / 'tuf'}, root keys {config.root_keys_dir}")
        if not existing_fleet:
            if fresh_keys is not None:
                signers, online, needed = list(fresh_keys.root), fresh_keys.online, threshold
            else:
                signers = load_root_keys(config.root_keys_dir)
                online, needed = load_online_keys(config.keys_dir), min(threshold, len(signers))
            init_repository(
                store, signers, needed, online,
                timestamp_expiry=timedelta(seconds=config.timestamp_expiry_s),
            )  # fmt: skip
            created.append("TUF repository")
        token = _first_admin(config, db, ca)
    finally:
        db.close()
    if token is not None:
        created.append(f"admin token {config.admin_token_path}")
    return InitReport(tuple(created), token)


def _ensure_ca(
    config: FleetConfig, created: list[str], *, existing_fleet: bool
) -> CertificateAuthority:
    key_path, cert_path = _ca_paths(config)
    if key_path.exists() or cert_path.exists():
        return CertificateAuthority.load(key_path, cert_path)
    if existing_fleet:
        raise ConfigError(
            f"the database {config.database_url.split('@')[-1]} holds a fleet already, and "
            f"{config.keys_dir} has none of its keys: copy the keys/ directory of a replica "
            "of that fleet here"
        )
    ca = CertificateAuthority.create()
    ca.save(key_path, cert_path)
    created.append(f"CA {cert_path}")
    return ca


def _first_admin(config: FleetConfig, db: FleetDatabase, ca: CertificateAuthority) -> str | None:
    with db.begin() as conn:
        if has_operator_tokens(conn):
            return None
        _, token = create_operator_token(
            conn, name="admin", scopes=["admin"], created_by="init", pin=ca.pin
        )
        write_audit(conn, actor="init", action="token.create", target="token/admin", outcome="ok")
        # Written before the transaction commits: a token in the database that nobody
        # holds would lock the operator out.
        _write_secret(config.admin_token_path, token + "\n")
    return token


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def ensure_server_certificate(config: FleetConfig, ca: CertificateAuthority) -> bool:
    """Issue ``DATA/keys/server.crt`` unless the one there covers every host and is not near
    its end; True if a new one was issued (the key is kept when there is one)."""
    key_path, cert_path = config.keys_dir / "server.key", config.keys_dir / "server.crt"
    hosts = config.server_hosts
    if key_path.exists() and cert_path.exists() and _covers(cert_path, hosts):
        return False
    key = load_private_key(key_path) if key_path.exists() else generate_key()
    if not key_path.exists():
        write_private_key(key_path, key)
    write_public_file(cert_path, ca.issue_server(key, hosts))
    return True


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    have |= {name.lower() for name in names.get_values_for_type(x509.DNSName)}
    for host in hosts:
        try:
            wanted = str(ipaddress.ip_address(host))
        except ValueError:
            wanted = host.lower()
        if wanted not in have:
            return False
    return cert.not_valid_after_utc.timestamp() - time.time() > _SERVER_RENEW_BEFORE_S


def load_keys(config: FleetConfig) -> FleetKeys:
    """The CA and the online TUF keys; ConfigError naming what is missing."""
    key_path, cert_path = _ca_paths(config)
    if not cert_path.exists():
        raise ConfigError(
            f"no fleet CA in {config.keys_dir}: run `edgeos fleet init --data {config.data_dir}` "
            "(or `edgeos fleet serve`, which does it) first"
        )
    return FleetKeys(
        CertificateAuthority.load(key_path, cert_path), load_online_keys(config.keys_dir)
    )


def open_repository(config: FleetConfig, db: FleetDatabase, keys: FleetKeys) -> TufRepository:
    """The TUF repository in ``db``, signing with the online keys."""
    return TufRepository(
        SqlTufStore(db.engine),
        keys.online,
        timestamp_expiry=timedelta(seconds=config.timestamp_expiry_s),
    )
