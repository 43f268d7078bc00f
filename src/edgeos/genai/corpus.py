"""The demo language model's training text: chats about a small shop's stock.

Every example is one exchange in the chat format of :mod:`edgeos.runtime.chat_format`: a
user's request (a reorder summary, a message to a customer, a note about a product) and
the answer the shop would write. The vocabulary is the demo's: its SKUs (``sku-NNN``),
its customers and products (:mod:`edgeos.demo.knowledge`), suppliers that ship short and
the retail calendar's events (:mod:`edgeos.demo.retail`), so the drafts the model learns to
write are the ones the demo asks of it. Generation is seeded: the same seed gives the same
corpus.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from edgeos.runtime.chat_format import format_exchange

PRODUCTS = (
    "oat milk",
    "dark roast coffee",
    "gluten-free bread",
    "free-range eggs",
    "greek yogurt",
    "orange juice",
    "basmati rice",
    "olive oil",
    "pasta",
    "tomato sauce",
    "bananas",
    "apples",
    "cheddar",
    "butter",
    "green tea",
    "sparkling water",
)
CUSTOMERS = ("Alice", "Bob", "Carla", "Dan", "Emma", "Farid", "Grace", "Hugo")
SUPPLIERS = ("Maria at the depot", "the dairy", "the bakery", "the fruit wholesaler")
EVENTS = ("Easter", "back to school", "Halloween", "Black Friday", "Christmas", "Valentine's")
REASONS = (
    "the supplier shipped it short",
    "the delivery came late",
    "sales doubled this week",
    "a promotion is running",
    "the truck was two hours late",
)


def _sku(rng: random.Random) -> str:
    return f"sku-{rng.randint(1, 12):03d}"


def _reorder(rng: random.Random) -> tuple[str, str]:
    sku, store = _sku(rng), rng.randint(1, 8)
    units, cover, lead = rng.randint(2, 40) * 6, rng.randint(1, 6), rng.randint(2, 13)
    product = rng.choice(PRODUCTS)
    ask = rng.choice(
        (
            f"Write a reorder summary for {sku} ({product}) at store {store}.",
            f"Summarize the reorder of {product}, {sku}, store {store}.",
            f"Reorder summary please: {sku} at store {store}.",
        )
    )
    answer = (
        f"Reorder {units} units of {sku} ({product}) for store {store}. "
        f"Stock covers {cover} days and the lead time is {lead} days, "
        f"so the order goes out today because {rng.choice(REASONS)}."
    )
    return ask, answer


def _customer_message(rng: random.Random) -> tuple[str, str]:
    name, product = rng.choice(CUSTOMERS), rng.choice(PRODUCTS)
    if rng.random() < 0.5:
        ask = rng.choice(
            (
                f"Tell {name} the {product} is back in stock.",
                f"Draft a message to {name}: {product} is back.",
                f"Let {name} know we have {product} again.",
            )
        )
        answer = (
            f"Hi {name}, good news: the {product} is back on the shelf. "
            f"We kept some aside for you until {rng.choice(('Friday', 'Monday', 'Sunday'))}."
        )
    else:
        days = rng.randint(2, 9)
        ask = rng.choice(
            (
                f"Tell {name} the {product} is delayed.",
                f"Draft a message to {name} about the late {product}.",
            )
        )
        answer = (
            f"Hi {name}, sorry: the {product} is delayed by about {days} days "
            f"because {rng.choice(REASONS)}. We will text you when it arrives."
        )
    return ask, answer


def _product_note(rng: random.Random) -> tuple[str, str]:
    sku, product, event = _sku(rng), rng.choice(PRODUCTS), rng.choice(EVENTS)
    fill = rng.choice((60, 66, 75, 80, 90))
    ask = rng.choice(
        (
            f"Write a product note for {sku} ({product}).",
            f"Note on {product} ({sku}) before {event}.",
        )
    )
    answer = (
        f"{sku} ({product}): {rng.choice(SUPPLIERS)} fills about {fill} percent of each order. "
        f"Demand rises before {event}, so order early and check the shelf daily."
    )
    return ask, answer


_KINDS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _reorder,
    _customer_message,
    _product_note,
)


def examples(count: int, *, seed: int = 0) -> Iterator[tuple[str, str]]:
    """``count`` (request, answer) pairs, the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.choice(_KINDS)(rng)


def corpus(count: int, *, seed: int = 0) -> list[str]:
    """``count`` training texts: each one exchange in the chat format, ending its turn."""
    return [format_exchange(ask, answer) for ask, answer in examples(count, seed=seed)]
