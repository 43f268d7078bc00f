"""Privacy classes of data: one definition for tasks, models and the fleet's venue rules.

From the most private: ``local-only`` data never leaves the device; ``restricted`` and
``internal`` data may leave it where the fleet's policy allows; ``public`` data may go
anywhere a policy allows. Tasks (``ctx.infer`` and ``agent.yaml``'s ``routing``), model
manifests and policy ``venues`` rules all speak these four names.
"""

from __future__ import annotations

from typing import Literal, get_args

PrivacyClass = Literal["local-only", "restricted", "internal", "public"]

#: Every privacy class, from the most private to the least.
PRIVACY_CLASSES: tuple[PrivacyClass, ...] = get_args(PrivacyClass)

#: The class of data whose task or model declares none.
DEFAULT_PRIVACY: PrivacyClass = "internal"


def stricter(first: str, second: str) -> str:
    """The more private of two classes (a task's data fed to a model keeps the stricter).

    ValueError when either is not a privacy class.
    """
    return min(first, second, key=PRIVACY_CLASSES.index)
