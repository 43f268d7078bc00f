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
  the field); a plugin without one takes no settings but ``operations``;
- ``from_config(config, secrets)``: the :class:`~edgeos.connectors.base.Connector` for a
  validated binding; ``secrets(name)`` reads the vault as far as the binding's scopes
  allow, or is None on a node without a vault. A setting may name a secret as
  ``${secret:NAME}``: the plugin fills it when it connects with
  :func:`edgeos.connectors.secret_refs.resolve`, which also masks the value in errors.

Built-in types are resolved first, so a plugin cannot replace ``http``. A plugin is
held to the same contract checks as the built-ins (:mod:`edgeos.connectors.conformance`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from edgeos.connectors.base import Connector
from edgeos.connectors.config import BUILT_IN_TYPES, PluginBinding
from edgeos.errors import ConfigError, EdgeOSError

GROUP = "edgeos.connectors"

#: ``secrets(name) -> value``: the vault as far as one binding's scopes allow.
Secrets = Callable[[str], str]


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: where it comes from, its settings model and its factory."""

    name: str
    #: The entry point's ``module:attribute``, as messages name the plugin.
    target: str
    config_model: type[PluginBinding]
    from_config: Callable[[Any, Secrets | None], object]


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
    if not callable(factory):
        raise ConfigError(f"{where} has no from_config(config, secrets)")
    return Plugin(kind, targets[0], model, factory)


def build_plugin(config: PluginBinding, secrets: Secrets | None) -> Connector:
    """The connector of a plugin binding; ConfigError naming plugin and binding when the
    plugin fails to build it or builds something that is not a Connector."""
    plugin = load_plugin(config.type)
    where = f"connector plugin {config.type!r} ({plugin.target}) for binding '{config.name}'"
    try:
        connector = plugin.from_config(config, secrets)
    except EdgeOSError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(connector, Connector):
        raise ConfigError(
            f"{where} built a {type(connector).__name__}, not a Connector (name, deliver, close)"
        )
    return connector
