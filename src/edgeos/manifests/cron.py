"""Five-field cron expressions (minute hour day-of-month month day-of-week), in local time.

Supports ``*``, numbers, ranges ``a-b``, steps ``*/n`` and ``a-b/n``, lists ``a,b``, and
the usual rule that when both day fields are restricted either may match.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))  # fmt: skip


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse; ValueError naming the field that is wrong."""
        parts = expression.split()
        if len(parts) != 5:
            raise ValueError(
                f"cron {expression!r} needs 5 fields (minute hour day month weekday), "
                f"has {len(parts)}"
            )
        sets = [
            _field(part, name, low, high)
            for part, (name, low, high) in zip(parts, _FIELDS, strict=True)
        ]
        weekdays = frozenset(d % 7 for d in sets[4])  # 7 is Sunday too
        return cls(
            expression, sets[0], sets[1], sets[2], sets[3], weekdays,
            parts[2] != "*", parts[4] != "*",
        )  # fmt: skip

    def matches(self, when: datetime) -> bool:
        """True if the schedule fires in the minute of ``when``."""
        if when.minute not in self.minutes or when.hour not in self.hours:
            return False
        if when.month not in self.months:
            return False
        day_ok = when.day in self.days
        weekday_ok = (when.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def next_after(self, when: datetime) -> datetime:
        """The first minute strictly after ``when`` at which the schedule fires."""
        candidate = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(366 * 24 * 60 * 5):  # any valid schedule fires within 5 years
            if self.matches(candidate):
                return candidate
            candidate += timedelta(minutes=1)
        raise ValueError(f"cron {self.expression!r} never fires")


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        body, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                start, end = low, high
            elif "-" in body:
                a, b = body.split("-", 1)
                start, end = int(a), int(b)
            else:
                start = end = int(body)
        except ValueError:
            raise ValueError(f"cron {name} field {text!r} is not a number, range or step") from None
        if step < 1 or start < low or end > high or start > end:
            raise ValueError(f"cron {name} field {text!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)
