"""Retry timing shared by every layer that tries again (delivery, supervisor, sync)."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, *, base: float = 0.5, cap: float = 60.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))],
    so many clients retrying at once spread out instead of stampeding.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return (rng or random).uniform(0.0, ceiling)
