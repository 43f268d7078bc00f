"""The long crash soak: many runs, a real node SIGKILLed at random moments throughout.

    python bench/crash_soak.py [--runs 1000] [--seed 7]

Prints how many kills it took, how many redeliveries the supplier deduplicated by key, and
whether every run finished with each effect applied exactly once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeos.demo.soak import run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    console = Console()
    with (
        tempfile.TemporaryDirectory(prefix="edgeos-soak-") as tmp,
        console.status("soaking") as status,
    ):
        result = run_soak(
            Path(tmp),
            runs=args.runs,
            seed=args.seed,
            max_seconds=args.max_seconds,
            on_kill=lambda k, done, pending: status.update(
                f"{k} SIGKILLs, {done}/{args.runs} runs finished, {pending} effects pending"
            ),
        )
    table = Table("measure", "value", title=f"crash soak: {args.runs} runs under SIGKILL")
    table.add_row("SIGKILLs", str(result.kills))
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("runs by state", ", ".join(f"{n} {s}" for s, n in sorted(result.states.items())))
    table.add_row("effects decided", str(result.effects))
    table.add_row("effects applied by the supplier", str(result.applied))
    table.add_row("redeliveries deduplicated by key", str(result.redeliveries))
    table.add_row("missing / unexpected / wrong payload",
                  f"{len(result.missing)} / {len(result.unexpected)} / {len(result.wrong_payload)}")  # fmt: skip
    table.add_row("journal verifies", "yes" if result.journal_ok else "NO")
    console.print(table)
    console.print(
        "every run finished, every effect exactly once" if result.ok else "[red]FAILED[/]"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
