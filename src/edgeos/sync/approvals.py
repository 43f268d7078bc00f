"""Escalations through the fleet: report the open ones, apply the operators' answers.

After each sync the node tells the fleet which escalations are open (the whole list when
it changed since the fleet last heard it) and what became of the answers it got, and
hears the answers operators gave. An answer is applied through the same path as one
given on the node's CLI or API (journaled, counted as an override when it differs from
the agent's proposal); one for an escalation already answered here or timed out is
refused, and the fleet is told why. An answer delivered twice (the node stopped before
it could report) is recognised as already applied.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from edgeos.agents import manage, store
from edgeos.errors import EdgeOSError, InvalidRequestError, NotFoundError
from edgeos.protocol.fleet import (
    API,
    AnswerResult,
    EscalationAnswer,
    EscalationAnswers,
    EscalationReport,
    PendingEscalation,
)
from edgeos.state import Database
from edgeos.sync.client import parse_answer, transport_error

log = logging.getLogger("edgeos.sync.approvals")

#: The most open escalations one report carries (the protocol's bound).
MAX_REPORTED = 500


def fleet_answerer(by: str) -> str:
    """How the node's journal names an answer that came through the fleet."""
    return f"fleet:{by}"


class EscalationRelay:
    """The node's half of approvals through the fleet.

    An applied answer sets its run pending again; the executor's scan (every second)
    takes it from there, as it does after an answer from the node's CLI.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._sent: list[PendingEscalation] | None = None  # what the fleet last heard
        self._results: list[AnswerResult] = []

    def open_escalations(self) -> list[PendingEscalation]:
        """The node's open escalations, oldest first, as the fleet hears them."""
        found: list[PendingEscalation] = []
        for e in store.escalations(self.db, state="open")[:MAX_REPORTED]:
            try:
                agent = store.run(self.db, e.run_id).agent
            except NotFoundError:  # the run went with retention: nothing to answer
                continue
            found.append(
                PendingEscalation(
                    id=e.id, agent=agent, run_id=e.run_id, step=e.step,
                    question=e.question[:4000], options=e.options, proposal=e.proposal,
                    default=e.default, deadline=e.deadline,
                )
            )  # fmt: skip
        return found

    def report(self, device_id: str) -> tuple[EscalationReport, list[PendingEscalation]] | None:
        """What to tell the fleet now, with the open list it says; None when nothing is due.

        Something is due while escalations are open (to hear answers), when the list
        changed since the fleet last heard it, and when results wait to be reported.
        """
        current = self.open_escalations()
        if not current and not self._results and current == self._sent:
            return None
        report = EscalationReport(
            device_id=device_id,
            open=None if current == self._sent else current,
            results=list(self._results),
        )
        return report, current

    def delivered(self, report: EscalationReport, current: list[PendingEscalation]) -> None:
        """The fleet took ``report`` in: it has heard ``current``, and the results it carried."""
        self._sent = current
        del self._results[: len(report.results)]

    def apply(self, answers: list[EscalationAnswer]) -> list[AnswerResult]:
        """Apply each answer as a local one would be; the results wait for the next report."""
        results = [self._apply_one(a) for a in answers]
        self._results.extend(results)
        return results

    def _apply_one(self, answer: EscalationAnswer) -> AnswerResult:
        by = fleet_answerer(answer.by)
        try:
            if manage.answer(self.db, answer.id, answer.choice, by=by, note=answer.note):
                log.info("escalation %s answered through the fleet by %s", answer.id, answer.by)
                return AnswerResult(id=answer.id, applied=True)
            row = store.escalation(self.db, answer.id)
        except (NotFoundError, InvalidRequestError) as exc:
            return AnswerResult(id=answer.id, applied=False, detail=str(exc)[:1000])
        if row.answered_by == by and str(row.answer) == str(answer.choice):
            return AnswerResult(id=answer.id, applied=True)  # delivered again: it was applied
        who = f" by {row.answered_by}" if row.answered_by else ""
        return AnswerResult(
            id=answer.id, applied=False,
            detail=f"escalation {answer.id} was {row.state.replace('_', ' ')} on the device{who}",
        )  # fmt: skip

    async def exchange(self, client: httpx.AsyncClient, device_id: str, url: str) -> None:
        """Report and apply answers, then report their results at once.

        A fleet problem here is logged, never raised: approvals must not stop the sync.
        """
        try:
            for _ in range(2):
                due = await asyncio.to_thread(self.report, device_id)
                if due is None:
                    return
                report, current = due
                try:
                    response = await client.post(
                        f"{API}/escalations", content=report.model_dump_json(),
                        headers={"content-type": "application/json"},
                    )  # fmt: skip
                except httpx.HTTPError as exc:
                    raise transport_error(exc, url, "the escalation report") from exc
                answers = parse_answer(response, EscalationAnswers, "the escalation report")
                self.delivered(report, current)
                if not answers.answers:
                    return
                await asyncio.to_thread(self.apply, answers.answers)
        except EdgeOSError as exc:
            log.warning("escalations not exchanged with the fleet: %s", exc)
