"""The fleet server's configuration: where its data lives and how it serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeos.errors import ConfigError

DEFAULT_PORT = 8480


@dataclass(frozen=True)
class FleetConfig:
    """Everything ``edgeos fleet serve`` needs; the defaults suit one server on one host.

    ``db_url`` defaults to the SQLite file ``DATA/fleet.db``; ``sans`` are extra host names
    or addresses the server's TLS certificate must name besides ``host`` and loopback.
    """

    data_dir: Path
    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    sans: tuple[str, ...] = ()
    #: How long a device certificate is valid; the node renews once a third is left.
    cert_validity_s: float = 24 * 3600.0
    #: How often a node should sync when it does not long-poll.
    sync_interval_s: float = 30.0
    #: How long a signed TUF timestamp is valid; re-signed when half of it is gone.
    timestamp_expiry_s: float = 24 * 3600.0
    #: How often the server looks whether the timestamp needs re-signing.
    timestamp_check_s: float = 60.0
    #: How often a long poll looks at the revision (shared by every waiting device).
    revision_poll_s: float = 0.25
    #: The largest artifact accepted by publish.
    max_artifact_bytes: int = 512 * 1024 * 1024
    #: Where the cloud venue runs models: None in this process; else on the Ray cluster at
    #: this address ("HOST:PORT", "ray://HOST:PORT", "auto"), or "local" to start one.
    cloud_ray: str | None = None
    #: Replicas of the cloud venue on Ray, (min, max): equal for a fixed number, else
    #: Ray Serve scales between them with the load.
    cloud_replicas: tuple[int, int] = (1, 4)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port}: use 1-65535")
        if self.cert_validity_s < 60:
            raise ConfigError(f"certificate validity {self.cert_validity_s} s: use 60 s or more")
        if self.sync_interval_s <= 0 or self.timestamp_expiry_s < 60:
            raise ConfigError("sync interval must be > 0 and timestamp expiry >= 60 s")
        if self.cloud_ray is not None and not self.cloud_ray.strip():
            raise ConfigError("cloud Ray address is empty: give HOST:PORT, auto or local")
        low, high = self.cloud_replicas
        if not 1 <= low <= high:
            raise ConfigError(f"cloud replicas {low}-{high}: use 1 <= min <= max, e.g. 2 or 1-4")

    @property
    def database_url(self) -> str:
        """The database to use: ``db_url``, else ``DATA/fleet.db``."""
        return self.db_url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    @property
    def keys_dir(self) -> Path:
        """The CA, server and online TUF keys: shared by every replica."""
        return self.data_dir / "keys"

    @property
    def root_keys_dir(self) -> Path:
        """The offline TUF root keys: to be moved off the server after init."""
        return self.data_dir / "root-keys"

    @property
    def admin_token_path(self) -> Path:
        """Where init writes the first admin token (0600)."""
        return self.data_dir / "admin-token"

    @property
    def server_hosts(self) -> list[str]:
        """Every name and address the server's certificate must cover."""
        hosts = ["localhost", "127.0.0.1", "::1"]
        if self.host not in ("0.0.0.0", "::", ""):
            hosts.append(self.host)
        hosts += self.sans
        return list(dict.fromkeys(hosts))
