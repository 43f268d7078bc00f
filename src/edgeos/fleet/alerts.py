"""Alerts: rules operators set on KPIs and devices, judged periodically, sent to webhooks.

A rule is a condition on one metric, for the devices a selector picks::

    p99_ms>250            local inference p99 latency over 250 ms
    decision_p99_ms>900   end-to-end decision p99 latency over 900 ms
    success_rate<0.95     task success rate under 95 %
    override_rate>0.2     people overrode more than 20 % of the answers they gave
    drift>0.3             drift signal over 0.3
    offline>10m           a device not heard from (no sync) for longer than 10 minutes

KPI rules judge the last ``window_s`` of telemetry, ``per`` device (each device of the
target on its own), agent or model version (fleet-wide over the target, which must then
be ``all`` or one ``group=G``: percentiles come from the merged sketches of every device,
so a fleet-wide p99 is a true one). Each rule has *subjects* (``device/ID``,
``agent/NAME``, ``model/NAME@VERSION``). A subject that breaks the rule *fires*: one
``firing`` notification, and no other for that rule and subject until it *resolves*
(stops breaking it, has no figure any more, or leaves the rule's devices), which sends
one ``resolved`` notification. The rows of ``alert_states`` are what
fires now; their primary key (rule, subject) is the de-duplication, so replicas judging
the same rule at once cannot both fire it.

Notifications are an outbox (``alert_notifications``): written in the transaction that
changes the state, then POSTed as JSON to the rule's webhook with an ``Idempotency-Key``
(the notification's id) and, when the rule has a secret, an HMAC-SHA256 signature
(``X-Edgeos-Signature: t=TIMESTAMP,v1=HEX`` over ``TIMESTAMP.BODY``). A failed delivery is
retried with backoff up to :data:`MAX_ATTEMPTS` times; a (rule, subject)'s notifications
go out in order, so a receiver never sees a resolve before its firing. A replica holds a
notification under a lease while it sends it.

KPI values come from a :class:`KpiSource`: :class:`TelemetryKpis` reads the fleet's
telemetry store (:mod:`edgeos.fleet.telemetry_store`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from edgeos.errors import ConfigError, ConflictError, EdgeOSError, NotFoundError
from edgeos.fleet import tables
from edgeos.fleet.db import FleetDatabase
from edgeos.fleet.selectors import Selector, parse_selector
from edgeos.retry import backoff_delay

log = logging.getLogger("edgeos.fleet.alerts")

Metric = Literal["p99_ms", "decision_p99_ms", "success_rate", "override_rate", "drift", "offline_s"]
KpiMetric = Literal["p99_ms", "decision_p99_ms", "success_rate", "override_rate", "drift"]
Per = Literal["device", "agent", "model"]
PERS: tuple[Per, ...] = ("device", "agent", "model")
#: How each metric is compared: latencies, overrides and drift over a bound, success under.
DIRECTIONS: dict[str, tuple[Metric, str]] = {
    "p99_ms": ("p99_ms", ">"),
    "decision_p99_ms": ("decision_p99_ms", ">"),
    "success_rate": ("success_rate", "<"),
    "override_rate": ("override_rate", ">"),
    "drift": ("drift", ">"),
    "offline": ("offline_s", ">"),
}
#: Attempts at delivering one notification before it is given up (dead).
MAX_ATTEMPTS = 10
#: How long a replica may hold a notification while it sends it.
LEASE_S = 60.0
#: The recent past a KPI rule judges, unless the rule says otherwise.
DEFAULT_WINDOW_S = 300.0

_CONDITION = re.compile(r"^\s*([a-z_0-9]+)\s*([<>])\s*([0-9][0-9.]*[a-z]*)\s*$")
_UNITS = "e.g. p99_ms>250, success_rate<0.95, drift>0.3 or offline>10m"


@dataclass(frozen=True)
class Condition:
    """A parsed condition: the metric, how it is compared, the bound."""

    metric: Metric
    op: str
    bound: float

    @property
    def text(self) -> str:
        """The condition as an operator writes it."""
        if self.metric == "offline_s":
            return f"offline>{self.bound:g}s"
        return f"{self.metric}{self.op}{self.bound:g}"

    def breached(self, value: float) -> bool:
        """Whether ``value`` breaks the rule."""
        return value > self.bound if self.op == ">" else value < self.bound


def parse_condition(text: str) -> Condition:
    """The condition ``text`` describes; ConfigError naming it and what is wrong otherwise."""
    match = _CONDITION.match(text)
    if not match:
        raise ConfigError(f"alert condition {text!r}: write METRIC>BOUND or METRIC<BOUND, {_UNITS}")
    name, op, number = match.groups()
    if name not in DIRECTIONS:
        raise ConfigError(
            f"alert condition {text!r}: unknown metric {name!r}; use {', '.join(DIRECTIONS)}"
        )
    metric, direction = DIRECTIONS[name]
    if op != direction:
        word = "over" if direction == ">" else "under"
        raise ConfigError(f"alert condition {text!r}: {name} alerts when it is {word} a bound, "
                          f"write {name}{direction}{number}")  # fmt: skip
    try:
        if metric == "offline_s":
            from edgeos.manifests.durations import parse_duration

            bound = parse_duration(float(number) if number.replace(".", "").isdigit() else number)
        else:
            bound = float(number)
    except ValueError as exc:
        raise ConfigError(f"alert condition {text!r}: {exc}") from None
    if not math.isfinite(bound) or bound < 0:
        raise ConfigError(f"alert condition {text!r}: the bound must be a finite number >= 0")
    return Condition(metric, op, bound)


def check_webhook(url: str) -> str:
    """``url`` if it can be a webhook (http or https, with a host); ConfigError otherwise."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"webhook {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"webhook {url!r}: give an http:// or https:// URL with a host")
    return url


def shown_webhook(url: str) -> str:
    """Where a webhook goes, without what may be a credential (its path, query, user):
    many services put the secret in the URL itself."""
    import httpx

    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}/..."


# -- rules ----------------------------------------------------------------------------
def create_rule(
    conn: Connection,
    *,
    name: str,
    condition: str,
    webhook: str,
    target: str = "all",
    per: str = "device",
    window_s: float = DEFAULT_WINDOW_S,
    secret: str | None = None,
    actor: str,
    now: float,
) -> dict[str, Any]:
    """Add a rule; ConfigError (bad condition, target, per or webhook), ConflictError (name)."""
    parsed = parse_condition(condition)
    fleet_wide_group(parse_selector(target), per, parsed)
    check_webhook(webhook)
    if not math.isfinite(window_s) or window_s <= 0:
        raise ConfigError(f"alert window {window_s!r}: give a positive number of seconds")
    taken = conn.execute(
        sa.select(tables.alert_rules.c.id).where(tables.alert_rules.c.name == name)
    ).first()
    if taken is not None:
        raise ConflictError(f"an alert rule named {name!r} exists already ({taken[0]})")
    row = {
        "id": f"al-{uuid.uuid4().hex[:16]}", "name": name, "metric": parsed.metric, "op": parsed.op,
        "bound": parsed.bound, "per": per, "window_s": window_s, "target": target,
        "webhook": webhook,
        "secret": secret or None, "created_by": actor, "created_at": now,
    }  # fmt: skip
    conn.execute(sa.insert(tables.alert_rules).values(**row))
    return rule_json(row)


def fleet_wide_group(selector: Selector, per: str, condition: Condition) -> str | None:
    """The group a fleet-wide rule (per agent or model) judges, None for the whole fleet;
    ConfigError when ``per`` is unknown or cannot apply to the condition or target."""
    if per not in PERS:
        raise ConfigError(f"alert per {per!r}: use {', '.join(PERS)}")
    if per == "device":
        return None
    if condition.metric == "offline_s":
        raise ConfigError(f"alert {condition.text}: is judged per device, not per {per}")
    kinds = {t.kind for t in selector.terms}
    if kinds == {"all"}:
        return None
    if kinds == {"group"} and len(selector.groups) == 1:
        return selector.groups[0]
    raise ConfigError(
        f"alert per {per} on target {str(selector)!r}: a fleet-wide figure is judged over "
        "the whole fleet or one group; give target all or group=G (or per device)"
    )


def rule_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A rule for the API: its condition spelled out; neither its secret nor its webhook's
    path shown."""
    condition = Condition(cast(Metric, row["metric"]), row["op"], row["bound"])
    return {
        "id": row["id"], "name": row["name"], "condition": condition.text,
        "metric": row["metric"], "bound": row["bound"], "per": row["per"],
        "window_s": row["window_s"],
        "target": row["target"], "webhook": shown_webhook(row["webhook"]),
        "signed": bool(row["secret"]),
        "created_by": row["created_by"], "created_at": row["created_at"],
    }  # fmt: skip


def list_rules(conn: Connection) -> list[dict[str, Any]]:
    """Every rule, by name."""
    rows = conn.execute(sa.select(tables.alert_rules).order_by(tables.alert_rules.c.name))
    return [rule_json(dict(r._mapping)) for r in rows]


def delete_rule(conn: Connection, rule_id: str) -> dict[str, Any]:
    """Remove a rule with what fires under it and its unsent notifications."""
    row = conn.execute(
        sa.select(tables.alert_rules).where(tables.alert_rules.c.id == rule_id)
    ).first()
    if row is None:
        raise NotFoundError(f"no alert rule with id '{rule_id}'")
    n = tables.alert_notifications
    conn.execute(sa.delete(n).where(n.c.rule_id == rule_id, n.c.state == "pending"))
    conn.execute(sa.delete(tables.alert_states).where(tables.alert_states.c.rule_id == rule_id))
    conn.execute(sa.delete(tables.alert_rules).where(tables.alert_rules.c.id == rule_id))
    return rule_json(dict(row._mapping))


def firing(conn: Connection) -> list[dict[str, Any]]:
    """What fires now: rule, subject, value, since when."""
    s, r = tables.alert_states, tables.alert_rules
    rows = conn.execute(
        sa.select(s, r.c.name).join(r, r.c.id == s.c.rule_id).order_by(s.c.since)
    ).all()
    return [
        {"rule_id": x.rule_id, "rule": x.name, "subject": x.subject, "value": x.value,
         "since": x.since}
        for x in rows
    ]  # fmt: skip


def notifications(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    """The newest notifications and how their delivery went."""
    n = tables.alert_notifications
    rows = conn.execute(sa.select(n).order_by(n.c.id.desc()).limit(limit)).all()
    return [
        {"id": x.id, "rule_id": x.rule_id, "subject": x.subject, "status": x.status,
         "state": x.state, "attempts": x.attempts, "created_at": x.created_at,
         "delivered_at": x.delivered_at, "error": x.error}
        for x in rows
    ]  # fmt: skip


# -- where KPI values come from -------------------------------------------------------
class KpiSource(Protocol):
    """Recent KPI values by device, agent or model version."""

    def kpi_values(
        self, metric: KpiMetric, *, per: Per, group: str | None, since: float, until: float
    ) -> Mapping[str, float]:
        """Each device id's, agent's or ``model@version``'s value of ``metric`` over
        ``[since, until)`` (of ``group``'s devices, or all); none where it is unknown."""
        ...


#: Which figure of a telemetry point each KPI metric reads.
_POINT_FIELDS: dict[str, str] = {
    "p99_ms": "inference_p99_ms", "decision_p99_ms": "decision_p99_ms",
    "success_rate": "success_rate", "override_rate": "override_rate", "drift": "drift",
}  # fmt: skip


class TelemetryKpis:
    """KPIs from the fleet's telemetry store: sketches merged across devices and minutes."""

    def __init__(self, db: FleetDatabase) -> None:
        self.db = db

    def kpi_values(
        self, metric: KpiMetric, *, per: Per, group: str | None, since: float, until: float
    ) -> Mapping[str, float]:
        """One value per device, agent or model version that has the figure."""
        from edgeos.fleet.telemetry_store import kpi_by

        points = kpi_by(self.db, per, start=since, end=until, group=group)
        field = _POINT_FIELDS[metric]
        values = {key: getattr(point, field) for key, point in points.items()}
        return {key: float(v) for key, v in values.items() if v is not None}


# -- judging --------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """A subject that started or stopped firing under a rule."""

    rule_id: str
    subject: str
    status: Literal["firing", "resolved"]
    value: float | None


class AlertEngine:
    """Judges every rule and sends what changed; ``tick`` does both (the lifespan loop)."""

    def __init__(
        self,
        db: FleetDatabase,
        kpis: KpiSource | None = None,
        *,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 5.0,
        base_delay: float = 2.0,
        max_delay: float = 300.0,
    ) -> None:
        self.db = db
        self.kpis: KpiSource = kpis or TelemetryKpis(db)
        self.clock = clock
        self.timeout_s = timeout_s
        self.base_delay = base_delay
        self.max_delay = max_delay

    def tick(self) -> None:
        """Judge the rules, then send the notifications due."""
        self.evaluate()
        self.deliver()

    def evaluate(self) -> list[Change]:
        """Judge every rule once; returns what started or stopped firing."""
        with self.db.read() as conn:
            rules = conn.execute(sa.select(tables.alert_rules)).all()
        changes: list[Change] = []
        for row in rules:
            rule, now = dict(row._mapping), self.clock()
            try:
                values = self._values(rule, now)
                with self.db.begin() as conn:
                    changes += self._judge(conn, rule, values, now)
            except IntegrityError:  # another replica judged it at the same moment
                log.debug("alert rule %s was judged by another replica", rule["id"])
            except EdgeOSError as exc:  # one rule that cannot be judged must not stop the rest
                log.warning("alert rule %s (%s) not judged: %s", rule["id"], rule["name"], exc)
        return changes

    def _judge(
        self, conn: Connection, rule: Mapping[str, Any], values: Mapping[str, float], now: float
    ) -> list[Change]:
        condition = Condition(rule["metric"], rule["op"], rule["bound"])
        breaking = {s: v for s, v in values.items() if condition.breached(v)}
        s = tables.alert_states
        held = {
            row.subject: row
            for row in conn.execute(sa.select(s).where(s.c.rule_id == rule["id"])).all()
        }
        changes = []
        for subject, value in breaking.items():
            if subject in held:
                conn.execute(
                    sa.update(s).where(s.c.rule_id == rule["id"], s.c.subject == subject)
                    .values(value=value, updated_at=now)
                )  # fmt: skip
                continue
            conn.execute(sa.insert(s).values(rule_id=rule["id"], subject=subject, value=value,
                                             since=now, updated_at=now))  # fmt: skip
            self._notify(conn, rule, condition, subject, "firing", value, now, now)
            changes.append(Change(rule["id"], subject, "firing", value))
        for subject, row in held.items():
            if subject in breaking:
                continue
            gone = conn.execute(
                sa.delete(s).where(s.c.rule_id == rule["id"], s.c.subject == subject)
            ).rowcount
            if gone != 1:  # another replica resolved it first: it sent the notification
                continue
            last = values.get(subject)
            self._notify(conn, rule, condition, subject, "resolved", last, row.since, now)
            changes.append(Change(rule["id"], subject, "resolved", last))
        return changes

    def _values(self, rule: Mapping[str, Any], now: float) -> dict[str, float]:
        """Each subject's figure now: every subject the rule judges, breaking it or not."""
        condition = Condition(rule["metric"], rule["op"], rule["bound"])
        selector = parse_selector(rule["target"])
        per: Per = rule["per"]
        since = now - rule["window_s"]
        if per != "device":
            group = fleet_wide_group(selector, per, condition)
            assert condition.metric != "offline_s"  # refused per agent or model
            found = self.kpis.kpi_values(
                condition.metric, per=per, group=group, since=since, until=now
            )
            return {f"{per}/{key}": value for key, value in found.items()}
        d = tables.devices
        with self.db.read() as conn:
            devices = conn.execute(
                sa.select(d.c.id, d.c.group_name, d.c.labels, d.c.enrolled_at, d.c.last_seen)
                .where(d.c.status == "active")
            ).all()  # fmt: skip
        chosen = {
            row.id: row for row in devices
            if selector.matches(row.id, row.group_name, json.loads(row.labels or "{}"))
        }  # fmt: skip
        if condition.metric == "offline_s":
            # Never heard from since enrolling counts from the enrollment.
            return {f"device/{r.id}": now - (r.last_seen or r.enrolled_at) for r in chosen.values()}
        if not chosen:
            return {}
        # A group term holds for every chosen device: the store need not read the others.
        group = selector.groups[0] if len(selector.groups) == 1 else None
        found = self.kpis.kpi_values(
            condition.metric, per="device", group=group, since=since, until=now
        )
        return {f"device/{key}": value for key, value in found.items() if key in chosen}

    @staticmethod
    def _notify(
        conn: Connection,
        rule: Mapping[str, Any],
        condition: Condition,
        subject: str,
        status: str,
        value: float | None,
        since: float,
        now: float,
    ) -> None:
        shown = "no figure" if value is None else f"{value:g}"
        verb = "breaks" if status == "firing" else "no longer breaks"
        body = {
            "status": status, "rule": {"id": rule["id"], "name": rule["name"],
                                       "condition": condition.text, "target": rule["target"]},
            "subject": subject, "value": value, "since": since, "at": now,
            "summary": f"{subject} {verb} {rule['name']} ({condition.text}): {shown}",
        }  # fmt: skip
        conn.execute(
            sa.insert(tables.alert_notifications).values(
                rule_id=rule["id"], subject=subject, status=status,
                body=json.dumps(body, sort_keys=True), state="pending", attempts=0,
                next_attempt_at=now, leased_until=0.0, created_at=now,
            )
        )  # fmt: skip

    # -- sending ----------------------------------------------------------------------
    def deliver(self, limit: int = 100) -> int:
        """Send the notifications due (each subject's in order); returns how many were tried."""
        now = self.clock()
        n = tables.alert_notifications
        with self.db.read() as conn:
            pending = conn.execute(
                sa.select(n.c.id, n.c.rule_id, n.c.subject, n.c.next_attempt_at, n.c.leased_until)
                .where(n.c.state == "pending").order_by(n.c.id).limit(limit * 4)
            ).all()  # fmt: skip
        first: dict[tuple[str, str], Any] = {}
        for row in pending:
            first.setdefault((row.rule_id, row.subject), row)
        due = [r for r in first.values() if r.next_attempt_at <= now and r.leased_until <= now]
        tried = 0
        for row in due[:limit]:
            if self._claim(row.id, now):
                self._send(row.id)
                tried += 1
        return tried

    def _claim(self, notification_id: int, now: float) -> bool:
        n = tables.alert_notifications
        with self.db.begin() as conn:
            claimed = conn.execute(
                sa.update(n)
                .where(n.c.id == notification_id, n.c.state == "pending",
                       n.c.leased_until <= now)
                .values(leased_until=now + LEASE_S)
            ).rowcount  # fmt: skip
        return bool(claimed)

    def _send(self, notification_id: int) -> None:
        import httpx

        n, r = tables.alert_notifications, tables.alert_rules
        with self.db.read() as conn:
            row = conn.execute(
                sa.select(n.c.body, n.c.attempts, r.c.webhook, r.c.secret)
                .join(r, r.c.id == n.c.rule_id).where(n.c.id == notification_id)
            ).first()  # fmt: skip
        if row is None:  # its rule was deleted meanwhile
            return
        body = row.body.encode()
        headers = {"Content-Type": "application/json",
                   "Idempotency-Key": f"edgeos-alert-{notification_id}"}  # fmt: skip
        if row.secret:
            headers["X-Edgeos-Signature"] = sign(row.secret, body, self.clock())
        error = None
        try:
            with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
                answer = client.post(row.webhook, content=body, headers=headers)
            if not 200 <= answer.status_code < 300:
                error = f"the webhook answered {answer.status_code}: {answer.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"the webhook could not be reached: {type(exc).__name__} ({exc})"
        self._record(notification_id, row.attempts + 1, error)

    def _record(self, notification_id: int, attempts: int, error: str | None) -> None:
        now = self.clock()
        n = tables.alert_notifications
        values: dict[str, Any] = {"attempts": attempts, "leased_until": 0.0, "error": error}
        if error is None:
            values.update(state="delivered", delivered_at=now)
        elif attempts >= MAX_ATTEMPTS:
            values.update(state="dead")
            log.error("alert notification %s given up after %d attempts: %s",
                      notification_id, attempts, error)  # fmt: skip
        else:
            delay = backoff_delay(attempts, base=self.base_delay, cap=self.max_delay)
            values.update(next_attempt_at=now + delay)
            log.warning("alert notification %s: attempt %d failed, again in %.1f s: %s",
                        notification_id, attempts, delay, error)  # fmt: skip
        with self.db.begin() as conn:
            conn.execute(sa.update(n).where(n.c.id == notification_id).values(**values))


def sign(secret: str, body: bytes, now: float) -> str:
    """The ``X-Edgeos-Signature`` value for ``body``: a receiver recomputes it with the
    rule's secret, and refuses an old timestamp (a replay)."""
    stamp = str(int(now))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"
