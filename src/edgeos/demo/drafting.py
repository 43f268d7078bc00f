"""Customer messages drafted by the demo's language model, held to a schema.

The demo's drafting model (``make genai-model``: about 0.9 M parameters) writes fluent text
of the demo's kinds but does not copy names and SKUs into its answer reliably, so it is
never asked to: the answer is decoded under a JSON Schema that holds what must be exact to
the one value it may have (the recipient, an ``enum`` of one; the message's first
sentence, which names the SKU, a fixed part of the text's ``pattern``), and leaves the
model the sentence after it, bounded in length and in what it may hold (letters, no
digits: no quantities or SKUs of its own). Constrained decoding writes the exact parts
exactly; the model writes the rest. The first sentence is the one its training messages
start with, so it goes on as they do ("We kept some aside for you until Friday.").

The recipient is personal (as in the messaging contract): the schema marks it so, the
journal keeps a pseudonym of it, and it is not in the prompt. The answer, about 50 of the
model's tokens, fits its 128-token context with the prompt.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeos.agents.context import RunContext

DRAFTER = "shop-drafter"
"""The name the demo registers its language model under."""
DRAFTER_MODEL = Path("var/genai-models/shop-drafter")
"""Where ``make genai-model`` exports the drafting model (an ONNX Runtime GenAI directory)."""
DRAFTER_ENV = "INVENTORY_DRAFTER"
"""The node process's variable naming the model that drafts customer messages; unset, the
agent sends the template."""
NOTE = (6, 41)
"""Characters of the model's sentence after the fixed one: at least, at most."""


def template(store: str, sku: str) -> str:
    """The message when nothing drafts it."""
    return f"Good news: {sku} is back in stock at {store}."


def lead(sku: str) -> str:
    """The drafted message's fixed first sentence."""
    return f"{sku} is back on the shelf."


def draft_schema(customer: str, sku: str) -> dict[str, Any]:
    """A message to ``customer`` about ``sku``: the recipient held to its value, the text
    to the fixed first sentence and a sentence of the model's within bounds."""
    low, high = NOTE
    sentence = f"[A-Z][A-Za-z ,']{{{low - 2},{high - 2}}}\\."
    return {
        "type": "object",
        "required": ["to", "text"],
        "additionalProperties": False,
        "properties": {
            "to": {"enum": [customer], "x-personal": True},
            "text": {"type": "string", "pattern": f"^{re.escape(lead(sku))} {sentence}$"},
        },
    }


def back_in_stock(
    ctx: RunContext, drafter: str | None, customer: str, store: str, sku: str
) -> dict[str, Any]:
    """The ``messaging.send`` payload telling ``customer`` that ``sku`` is back at ``store``:
    drafted by the generative model ``drafter`` (on this device: the recipient is personal)
    or, without one, the template."""
    if drafter is None:
        return {"to": customer, "store": store, "sku": sku, "text": template(store, sku)}
    # Short: the prompt shares the context with the answer.
    reply = ctx.llm(drafter).chat(
        [{"role": "user", "content": f"Tell the customer {sku} is back."}],
        schema=draft_schema(customer, sku),
        temperature=0.7,
        seed=ctx.random().randrange(2**31),
        privacy="local-only",
    )
    draft = reply.parsed
    return {"to": draft["to"], "store": store, "sku": sku, "text": draft["text"]}
