"""What the demo store's inventory agent knows before its first run: its long-term memory.

Supplier notes and customer preferences, as a store manager would write them down. The
demo remembers them for the agent when it installs it (embedded on the device by
all-MiniLM-L6-v2); the agent recalls them by meaning. Supplier notes that say a SKU is
delivered short carry the share the supplier fills (``fill_rate``): the agent's reason step
raises its reorders of that SKU to make up for it, and the demo's supplier really does
ship those SKUs short. The agent adds what it learns itself: reorders that did not keep
the shelf stocked.

:data:`PARAPHRASES` are the questions people (or the agent) ask for each note in other
words: the recall-quality check of ``tests/test_memory_embeddings.py`` expects each
note in the top 3 of its question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The embedding model of the agent's memory (its ``agent.yaml`` names it too).
EMBEDDING_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Note:
    """One thing the agent remembers: its text, and metadata recall filters on."""

    key: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    subject: str | None = None


SUPPLIER_NOTES = [
    Note("short-001", "The last three deliveries of sku-001 were a quarter short: the "
         "supplier only fills about 75 percent of every order of it.",
         {"kind": "supplier", "sku": "sku-001", "fill_rate": 0.75}),
    Note("short-004", "sku-004 keeps arriving short, roughly a fifth under the quantity we "
         "ordered, because the supplier rations it.",
         {"kind": "supplier", "sku": "sku-004", "fill_rate": 0.8}),
    Note("short-007", "Only two thirds of each sku-007 order reaches us; the supplier's "
         "warehouse is low on it.",
         {"kind": "supplier", "sku": "sku-007", "fill_rate": 0.66}),
    Note("late-001", "The refrigerated truck that brings sku-001 was two hours late three "
         "weeks in a row.", {"kind": "supplier", "sku": "sku-001"}),
    Note("price-004", "The supplier raised the price of sku-004 by 8 percent in March.",
         {"kind": "supplier", "sku": "sku-004"}),
    Note("case-009", "sku-009 can only be ordered in whole cases of 24 units, placed two "
         "days ahead.", {"kind": "supplier", "sku": "sku-009"}),
    Note("organic-010", "The supplier can send an organic variant of sku-010 if it is "
         "ordered a week in advance.", {"kind": "supplier", "sku": "sku-010"}),
    Note("contact", "For urgent orders call Maria at the supplier's depot, not the "
         "general line.", {"kind": "supplier"}),
]  # fmt: skip

CUSTOMER_PREFERENCES = [
    Note("alice-milk", "Alice Martin is lactose intolerant and buys oat milk every week.",
         {"kind": "customer"}, subject="customer-alice"),
    Note("bob-coffee", "Bob Chen wants a text message when the dark roast coffee is back "
         "on the shelf.", {"kind": "customer"}, subject="customer-bob"),
    Note("carla-gluten", "Carla Diaz asks for gluten-free bread and pays by card.",
         {"kind": "customer"}, subject="customer-carla"),
    Note("dan-bulk", "Dan's restaurant buys eggs in bulk, thirty dozen each Monday.",
         {"kind": "customer"}, subject="customer-dan"),
]  # fmt: skip

NOTES = [*SUPPLIER_NOTES, *CUSTOMER_PREFERENCES]

PARAPHRASES = {
    "which product does the supplier deliver only three quarters of?": "short-001",
    "is sku-004 delivered in full or do we get less than we asked for?": "short-004",
    "we receive just 66% of what we order of one item: which?": "short-007",
    "has the chilled delivery been arriving on time?": "late-001",
    "did an item get more expensive this spring?": "price-004",
    "what is the smallest quantity we can order of sku-009?": "case-009",
    "can we get an organic version of a product?": "organic-010",
    "who should I phone when we need stock quickly?": "contact",
    "which customer cannot drink regular milk?": "alice-milk",
    "who wants to be notified about the coffee restock?": "bob-coffee",
    "a shopper with a wheat allergy, what does she buy?": "carla-gluten",
    "which restaurant orders lots of eggs at the start of the week?": "dan-bulk",
}

#: What the supplier really fills of each SKU its notes call short.
FILL_RATES = {
    n.metadata["sku"]: n.metadata["fill_rate"] for n in SUPPLIER_NOTES if "fill_rate" in n.metadata
}
