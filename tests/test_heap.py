"""The node's C heap hands large freed buffers back to the system (glibc), and is left
alone elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edgeos.node import heap

MB = 1024 * 1024

# A fresh interpreter frees a 16 MB buffer twice (the first free raises glibc's threshold
# unless it is fixed), then prints how much more it holds resident than before.
PROGRAM = textwrap.dedent(
    """
    import sys
    from edgeos.node import heap
    from edgeos.telemetry.process import rss_bytes
    if sys.argv[1] == "tuned":
        assert heap.tune()
    before = rss_bytes()
    for _ in range(2):
        buffer = bytearray(16 * 1024 * 1024)  # zero-filled: resident
        del buffer
    print(rss_bytes() - before)
    """
)


def held_after_free(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(heap.glibc() is None, reason="the C library is not glibc")
def test_a_large_freed_buffer_goes_back_to_the_system() -> None:
    assert held_after_free("default") > 12 * MB  # what glibc keeps on its own
    assert held_after_free("tuned") < 4 * MB


def test_without_glibc_nothing_is_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_glibc(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(os, "confstr", not_glibc)
    assert heap.glibc() is None
    assert heap.tune() is False
    monkeypatch.delattr(os, "confstr")  # Windows has no confstr at all
    assert heap.tune() is False
