"""Node settings, declared once.

Each setting is a row of :data:`NODE_SETTINGS`: a name, a type, a default and a help
text. The same table drives command-line flags, ``EDGEOS_<NAME>`` environment variables,
the optional ``node.yaml`` in the data directory, and ``docs/configuration.md``.
Precedence: flag, then environment, then ``node.yaml``, then default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeos.errors import ConfigError

ENV_PREFIX = "EDGEOS_"
#: An idle node's resident memory is well under this; a budget below it cannot work.
MIN_MEMORY_MB = 64
CONFIG_FILE = "node.yaml"


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where a node keeps its state unless told otherwise."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgeos"


@dataclass(frozen=True)
class Setting:
    """One configurable value of the node."""

    name: str
    kind: str  # "str", "level", "int", "bool", "path" or "list"
    default: Any
    help: str

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return ENV_PREFIX + self.name.upper()


NODE_SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "path", None, "Directory for the node database and model store "
            "(default: $XDG_DATA_HOME/edgeos)."),
    Setting("host", "str", "127.0.0.1", "Address the node's HTTP API listens on."),
    Setting("port", "int", 8470, "Port of the node's HTTP API."),
    Setting("tls_cert_file", "path", None, "Certificate (PEM, its chain after it) the API "
            "serves HTTPS with; with tls_key_file (default: none, plain HTTP)."),
    Setting("tls_key_file", "path", None, "Private key (PEM) of tls_cert_file."),
    Setting("tls_client_ca_file", "path", None, "CA certificate(s) (PEM) a caller off the "
            "device must present a client certificate of, besides its token; callers on "
            "the device itself need none. With tls_cert_file (default: none)."),
    Setting("tls_client_crl_file", "path", None, "Revocation list (PEM) of "
            "tls_client_ca_file's CA: client certificates on it are refused; read at start "
            "(default: none)."),
    Setting("intra_op_threads", "int", 1, "ONNX Runtime threads inside one operator. 1 keeps "
            "a shared box responsive; concurrency comes from parallel calls."),
    Setting("inter_op_threads", "int", 1, "ONNX Runtime threads across operators."),
    Setting("inference_threads", "int", 0, "Threads running model calls in parallel "
            "(0: one per CPU core)."),
    Setting("execution_providers", "list", ["CPUExecutionProvider"], "ONNX Runtime execution "
            "providers the node may use, in order of preference (comma-separated)."),
    Setting("allow_spinning", "bool", False, "Let ONNX Runtime threads spin between runs "
            "(lower latency, but burns idle CPU)."),
    Setting("model_memory_budget_mb", "int", 512, "Memory for loaded models; the least "
            "recently used are unloaded to stay under it."),
    Setting("memory_budget_mb", "int", 0, "Memory the whole node may use (0: no budget). Near "
            "it the node unloads idle models and raises an alert; at least 64."),
    Setting("disk_budget_mb", "int", 0, "Disk the data directory may use (0: no budget). Near it "
            "the node prunes per retention, compacts, and raises an alert."),
    Setting("disk_reserve_mb", "int", 64, "Free space to keep on the data directory's filesystem; "
            "below it the node acts as if over its disk budget."),
    Setting("log_level", "level", "info", "Log level: debug, info, warning or error."),
    Setting("fleet_url", "str", None, "Fleet control plane to follow, https://HOST:PORT "
            "(default: none). The join token of the first enrollment is given apart, with "
            "--join-token or EDGEOS_JOIN_TOKEN."),
    Setting("telemetry_buffer_mb", "int", 16, "Disk for telemetry waiting to reach the fleet; "
            "when full, logs go first, then traces, then KPIs, then alerts."),
    Setting("telemetry_interval_s", "int", 60, "Seconds between telemetry batches to the fleet."),
    Setting("telemetry_bytes_per_s", "int", 2048, "Bandwidth cap of the telemetry uplink, "
            "compressed bytes per second (averaged over batches)."),
    Setting("telemetry_bytes_per_day", "int", 4_000_000, "Bandwidth cap of the telemetry "
            "uplink, compressed bytes per UTC day; past it, telemetry waits in the buffer."),
    Setting("telemetry_trace_percent", "int", 10, "Percent of traces sent to the fleet "
            "(whole traces, chosen by trace id; 0 sends none)."),
    Setting("tracing", "bool", True, "Record OpenTelemetry traces of agent runs (run, steps, "
            "model calls, effects and their deliveries) in the node database."),
    Setting("trace_keep_spans", "int", 20000, "Spans of traces kept in the node database; "
            "the oldest go first."),
    Setting("trace_otlp_endpoint", "str", None, "Also send spans to this OTLP/HTTP traces "
            "endpoint, e.g. http://collector:4318/v1/traces (default: none)."),
)  # fmt: skip

_BY_NAME = {s.name: s for s in NODE_SETTINGS}


@dataclass(frozen=True)
class NodeSettings:
    """The resolved settings of one node."""

    data_dir: Path
    host: str
    port: int
    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_client_ca_file: Path | None
    tls_client_crl_file: Path | None
    intra_op_threads: int
    inter_op_threads: int
    inference_threads: int
    execution_providers: tuple[str, ...]
    allow_spinning: bool
    model_memory_budget_mb: int
    memory_budget_mb: int
    disk_budget_mb: int
    disk_reserve_mb: int
    log_level: str
    fleet_url: str | None
    telemetry_buffer_mb: int
    telemetry_interval_s: int
    telemetry_bytes_per_s: int
    telemetry_bytes_per_day: int
    telemetry_trace_percent: int
    tracing: bool
    trace_keep_spans: int
    trace_otlp_endpoint: str | None

    @property
    def api_url(self) -> str:
        """Where a client on this machine reaches the node's API (an address listening on
        every interface is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.api_scheme}://{host}:{self.port}"

    @property
    def api_scheme(self) -> str:
        """``https`` when the API has a certificate, else ``http``."""
        return "https" if self.tls_cert_file else "http"

    @property
    def database_path(self) -> Path:
        """The node database file."""
        return self.data_dir / "node.db"

    @property
    def model_store(self) -> Path:
        """Where model files are kept, by content hash."""
        return self.data_dir / "models"


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> NodeSettings:
    """Resolve every setting from flags, environment, ``node.yaml`` and defaults."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    unknown = sorted(set(flags) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    data_dir = _resolve(_BY_NAME["data_dir"], flags, environ, {}, "")
    values["data_dir"] = Path(data_dir) if data_dir is not None else default_data_dir(environ)
    config_path = values["data_dir"] / CONFIG_FILE
    file_values = _read_config(config_path)
    for setting in NODE_SETTINGS[1:]:
        values[setting.name] = _resolve(setting, flags, environ, file_values, str(config_path))
    if values["inference_threads"] == 0:
        values["inference_threads"] = os.cpu_count() or 1
    values["execution_providers"] = tuple(values["execution_providers"])
    values["fleet_url"] = values["fleet_url"] or None  # an empty variable sets nothing
    values["trace_otlp_endpoint"] = values["trace_otlp_endpoint"] or None
    for name in _TLS_FILES:  # an empty variable sets nothing
        values[name] = values[name] if values[name] not in (None, Path("")) else None
    _check_ranges(values)
    _check_tls(values)
    return NodeSettings(**values)


def _resolve(
    setting: Setting,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    config_path: str,
) -> Any:
    if setting.name in flags:
        return _coerce(setting, flags[setting.name], f"--{setting.name.replace('_', '-')}")
    if setting.env in environ:
        return _coerce(setting, environ[setting.env], setting.env)
    if setting.name in file_values:
        return _coerce(setting, file_values[setting.name], f"{config_path}: {setting.name}")
    return setting.default


def _coerce(setting: Setting, value: Any, where: str) -> Any:
    parse: Callable[[Any], Any] = _PARSERS[setting.kind]
    try:
        return parse(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {setting.kind} ({exc})") from exc


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("use a whole number")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("use a whole number")
    return int(value)


def _parse_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("use a comma-separated list of names")


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "str": str,
    "level": lambda v: str(v).strip().lower(),
    "int": _parse_int,
    "bool": _parse_bool,
    "path": lambda v: Path(str(v)),
    "list": _parse_list,
}


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    import yaml  # here: most nodes have no node.yaml, and need no YAML parser

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read as YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of setting: value")
    keys = {str(k) for k in data}
    unknown = sorted(keys - set(_BY_NAME) | ({"data_dir"} & keys))
    if unknown:
        raise ConfigError(
            f"{path}: unknown or misplaced setting(s) {', '.join(unknown)} "
            f"(known: {', '.join(s.name for s in NODE_SETTINGS[1:])})"
        )
    return {str(k): v for k, v in data.items()}


def _check_ranges(values: Mapping[str, Any]) -> None:
    checks = [
        ("port", 1 <= values["port"] <= 65535, "must be between 1 and 65535"),
        ("intra_op_threads", values["intra_op_threads"] >= 0, "must be 0 or more"),
        ("inter_op_threads", values["inter_op_threads"] >= 0, "must be 0 or more"),
        ("inference_threads", values["inference_threads"] >= 1, "must be 1 or more"),
        ("model_memory_budget_mb", values["model_memory_budget_mb"] >= 1, "must be 1 or more"),
        (
            "memory_budget_mb",
            values["memory_budget_mb"] == 0 or values["memory_budget_mb"] >= MIN_MEMORY_MB,
            f"is below the {MIN_MEMORY_MB} MB a node needs to start (0 turns the budget off)",
        ),
        ("disk_budget_mb", values["disk_budget_mb"] >= 0, "must be 0 (no budget) or more"),
        ("disk_reserve_mb", values["disk_reserve_mb"] >= 0, "must be 0 or more"),
        (
            "log_level",
            values["log_level"] in ("debug", "info", "warning", "error"),
            "must be debug, info, warning or error",
        ),
        ("execution_providers", bool(values["execution_providers"]), "must name one or more"),
        (
            "fleet_url",
            values["fleet_url"] is None or str(values["fleet_url"]).startswith("https://"),
            "must be an https:// URL (the fleet is reached over TLS only)",
        ),
        ("telemetry_buffer_mb", values["telemetry_buffer_mb"] >= 1, "must be 1 or more"),
        ("telemetry_interval_s", values["telemetry_interval_s"] >= 1, "must be 1 or more"),
        ("telemetry_bytes_per_s", values["telemetry_bytes_per_s"] >= 64, "must be 64 or more"),
        (
            "telemetry_bytes_per_day",
            values["telemetry_bytes_per_day"] >= 4096,
            "must be 4096 or more",
        ),
        (
            "telemetry_trace_percent",
            0 <= values["telemetry_trace_percent"] <= 100,
            "must be between 0 and 100",
        ),
        ("trace_keep_spans", values["trace_keep_spans"] >= 1, "must be 1 or more"),
        (
            "trace_otlp_endpoint",
            values["trace_otlp_endpoint"] is None
            or str(values["trace_otlp_endpoint"]).startswith(("http://", "https://")),
            "must be an http:// or https:// URL",
        ),
    ]
    for name, ok, message in checks:
        if not ok:
            raise ConfigError(f"setting {name} = {values[name]!r} {message}")


_TLS_FILES = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "tls_client_crl_file")


def _check_tls(values: Mapping[str, Any]) -> None:
    cert, key = values["tls_cert_file"], values["tls_key_file"]
    if (cert is None) != (key is None):
        given, missing = ("tls_cert_file", "tls_key_file") if key is None else (
            "tls_key_file", "tls_cert_file")  # fmt: skip
        raise ConfigError(f"setting {given} is set without {missing}: HTTPS needs both")
    if values["tls_client_ca_file"] is not None and cert is None:
        raise ConfigError(
            "setting tls_client_ca_file is set without tls_cert_file and tls_key_file: "
            "client certificates are asked for over HTTPS only"
        )
    if values["tls_client_crl_file"] is not None and values["tls_client_ca_file"] is None:
        raise ConfigError(
            "setting tls_client_crl_file is set without tls_client_ca_file: it revokes "
            "client certificates of that CA"
        )
    for name in _TLS_FILES:
        path = values[name]
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"setting {name} = {str(path)!r}: no such file")


def settings_markdown() -> str:
    """The settings table as Markdown, for docs/configuration.md."""
    rows = ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for s in NODE_SETTINGS:
        default = ", ".join(s.default) if isinstance(s.default, list) else s.default
        shown = "see meaning" if default is None else f"`{default}`"
        rows.append(f"| `{s.name}` | `{s.env}` | {shown} | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
