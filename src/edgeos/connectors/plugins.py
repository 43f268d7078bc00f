"""Connector plugins: connector types installed as Python packages.

A package provides a connector type through an entry point in the group
``edgeos.connectors``; its name is the ``type`` that bindings use::

    # the plugin's pyproject.toml
    [project.entry-points."edgeos.connectors"]
    echo = "edgeos_echo_connector:EchoConnector"

    # connectors.yaml
    relay:
      type: echo
      host: 127.0.0.1
      operations: {say: {}}

The object the entry point names has

- ``config_model``: a subclass of :class:`~edgeos.connectors.config.PluginBinding`, the
  binding's settings, validated like those of a built-in type (errors name the file and
  the field); a plugin without one takes no settings but ``operations`` and ``subscribe``;
- ``from_config(config, secrets)`` (effects): the
  :class:`~edgeos.connectors.base.Connector` for a validated binding with
  ``operations``; ``secrets(name)`` reads the vault as far as the binding's scopes
  allow, or is None on a node without a vault. A setting may name a secret as
  ``${secret:NAME}``: the plugin fills it when it connects with
  :func:`edgeos.connectors.secret_refs.resolve`, which also masks the value in errors;
- ``source_from_config(setup)`` (events, the sense side): the
  :class:`~edgeos.connectors.events.Source` for a validated binding with ``subscribe``,
  which emits each event under its ``subscribe`` name, at least once (see
  :mod:`edgeos.connectors.events`). ``setup`` is a :class:`SourceSetup`: the binding, its
  secrets, and a directory of its own to keep what it has emitted.

A plugin has ``from_config``, ``source_from_config`` or both. A sense-side binding
implements a contract's events like an ``mqtt`` one (``subscribe: {pos.sales: {...}}``)::

    till:
      type: echo
      port: 7007
      implements: {capability: pos, version: "1.0"}
      subscribe:
        pos.sales: {channel: sales}

Built-in types are resolved first, so a plugin cannot replace ``http``. A plugin is
held to the same contract checks as the built-ins (:mod:`edgeos.connectors.conformance`),
effects and events alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from edgeos.connectors.base import Connector
from edgeos.connectors.config import BUILT_IN_TYPES, PluginBinding
from edgeos.connectors.events import Source
from edgeos.errors import ConfigError, EdgeOSError

GROUP = "edgeos.connectors"

#: ``secrets(name) -> value``: the vault as far as one binding's scopes allow.
Secrets = Callable[[str], str]


@dataclass(frozen=True)
class SourceSetup:
    """What a plugin's ``source_from_config`` builds the source of one binding from (one
    argument, so that it can grow without breaking plugins)."""

    #: The validated binding: an instance of the plugin's ``config_model``.
    config: Any
    #: ``secrets(name)``: the vault as far as the binding's scopes allow; None without one.
    secrets: Secrets | None
    #: A directory of the binding's own (it exists), kept across restarts: where the
    #: source records what it has emitted.
    state_dir: Path


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: where it comes from, its settings model and its factories."""

    name: str
    #: The entry point's ``module:attribute``, as messages name the plugin.
    target: str
    config_model: type[PluginBinding]
    #: The effects' connector of a binding; None for a plugin that only emits events.
    from_config: Callable[[Any, Secrets | None], object] | None
    #: The events' source of a binding; None for a plugin that only takes effects.
    source_from_config: Callable[[SourceSetup], object] | None = None


def installed() -> dict[str, list[EntryPoint]]:
    """The plugin types installed in this Python environment, by name (a built-in name is
    left out: it never resolves to a plugin)."""
    found: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=GROUP):
        if point.name not in BUILT_IN_TYPES:
            found.setdefault(point.name, []).append(point)
    return found


def load_plugin(kind: str) -> Plugin:
    """The plugin of connector type ``kind``; ConfigError when none or several packages
    provide it, or when it cannot be imported or is not shaped like a plugin."""
    available = installed()
    points = available.get(kind)
    if not points:
        plugins = ", ".join(sorted(available)) or f"none installed (entry points {GROUP})"
        raise ConfigError(
            f"unknown connector type {kind!r} (built in: {', '.join(BUILT_IN_TYPES)}; "
            f"plugins: {plugins})"
        )
    targets = sorted({p.value for p in points})
    if len(targets) > 1:
        raise ConfigError(
            f"connector type {kind!r} is provided by several packages ({', '.join(targets)}); "
            f"uninstall all but one"
        )
    where = f"connector plugin {kind!r} ({targets[0]})"
    try:
        loaded = points[0].load()
    except Exception as exc:  # whatever its import raises, the binding cannot be used
        raise ConfigError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    model = getattr(loaded, "config_model", PluginBinding)
    if not (isinstance(model, type) and issubclass(model, PluginBinding)):
        raise ConfigError(
            f"{where}: config_model must be a subclass of edgeos.connectors.config.PluginBinding"
        )
    factory = getattr(loaded, "from_config", None)
    source = getattr(loaded, "source_from_config", None)
    if not callable(factory) and not callable(source):
        raise ConfigError(
            f"{where} has no from_config(config, secrets) for effects, nor "
            "source_from_config(setup) for events"
        )
    return Plugin(
        kind, targets[0], model,
        factory if callable(factory) else None,
        source if callable(source) else None,
    )  # fmt: skip


def build_plugin(config: PluginBinding, secrets: Secrets | None) -> Connector:
    """The connector of a plugin binding; ConfigError naming plugin and binding when the
    plugin takes no effects, fails to build it or builds something that is not a
    Connector."""
    plugin = load_plugin(config.type)
    where = _where(plugin, config)
    if plugin.from_config is None:
        raise ConfigError(
            f"{where}: the plugin takes no effects (it has no from_config): remove operations"
        )
    connector: Connector = _built(
        where, plugin.from_config, (config, secrets), Connector,
        "a Connector (name, deliver, close)",
    )  # fmt: skip
    return connector


def build_plugin_source(
    config: PluginBinding, secrets: Secrets | None, *, state_dir: Path
) -> Source:
    """The event source of a plugin binding, its state under ``state_dir/plugin-<binding>``;
    ConfigError naming plugin and binding when the plugin emits no events, fails to build
    the source or builds something that is not a Source."""
    plugin = load_plugin(config.type)
    where = _where(plugin, config)
    if plugin.source_from_config is None:
        raise ConfigError(
            f"{where}: the plugin emits no events (no source_from_config): remove subscribe"
        )
    own = state_dir / f"plugin-{config.name}"
    try:
        own.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot make {own}: {exc.strerror or exc}") from exc
    setup = SourceSetup(config, secrets, own)
    source: Source = _built(
        where, plugin.source_from_config, (setup,), Source, "a Source (name, start, stop)"
    )
    return source


def _where(plugin: Plugin, config: PluginBinding) -> str:
    return f"connector plugin {config.type!r} ({plugin.target}) for binding '{config.name}'"


def _built(
    where: str, factory: Callable[..., object], args: tuple[Any, ...], kind: type[Any], shape: str
) -> Any:
    """What ``factory(*args)`` built, if it is a ``kind``; ConfigError naming ``where``
    otherwise (an EdgeOSError the plugin raised passes as it is)."""
    try:
        built = factory(*args)
    except EdgeOSError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(built, kind):
        raise ConfigError(f"{where} built a {type(built).__name__}, not {shape}")
    return built
