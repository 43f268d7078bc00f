"""``${secret:NAME}``: how a configuration file names a secret of the node's vault instead of
holding it (connector bindings, venues). No pydantic here: cheap to import."""

from __future__ import annotations

import re

#: ``${secret:NAME}``: the name of a secret in the vault.
SECRET_REF = re.compile(r"\$\{secret:([A-Za-z0-9][A-Za-z0-9._-]{0,63})\}")


def secret_name(value: str) -> str | None:
    """The NAME of ``value`` when it is exactly ``${secret:NAME}``, else None."""
    match = SECRET_REF.fullmatch(value.strip())
    return None if match is None else match.group(1)
