"""Synthetic structured records for the evaluation-only needles: warehouse inventory (needle:json) and shipments
(needle:csv), drawn from a seeded generator and the word lists below, never from corpus text, so that no trace source
holds a line of them.

A needle sample hides one record (the needle) among filler records: `size` of them drawn in order from one generator,
so that a smaller size is a prefix of a larger one (fit_to_context's bisection relies on it), none sharing the needle's
key or holding its key or asked value anywhere, so that both occur once in the table.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from kvpolicy.data.ruler import insert_at_depths

Record = dict[str, str | int]  # field -> value, in display order; no value holds a comma, quote or newline

MATERIALS = ("stainless", "cordless", "ceramic", "folding", "walnut", "galvanized", "insulated", "brushed", "compact",
             "heavy-duty", "waterproof", "magnetic", "bamboo", "cast-iron", "rechargeable", "adjustable")
PRODUCTS = ("kettle", "drill", "lantern", "stool", "shelf bracket", "extension cord", "toolbox", "desk lamp",
            "hinge set", "garden hose", "thermos", "ladder", "padlock", "saucepan", "tape measure", "wall clock",
            "door mat")
CITIES = ("Rotterdam", "Lyon", "Gdansk", "Porto", "Tampere", "Graz", "Bilbao", "Brno", "Aarhus", "Ghent", "Turin",
          "Leipzig", "Cork", "Malmo", "Riga", "Valencia", "Zagreb", "Utrecht")
CARRIERS = ("NordFreight", "Alpine Parcel", "BlueLine Cargo", "Meridian Post", "Harbor Express", "Swift Lanes")


def draw_code(rng: random.Random, pattern: str) -> str:
    """A code following `pattern`: each L an uppercase letter, each D a digit, anything else kept ("LL-DDDD")."""
    pools = {"L": string.ascii_uppercase, "D": string.digits}
    return "".join(rng.choice(pools[c]) if c in pools else c for c in pattern)


def inventory_record(rng: random.Random) -> Record:
    """One warehouse inventory line: a product under its SKU, stored in one bin of one warehouse."""
    return {"sku": draw_code(rng, "LL-DDDD"), "product": f"{rng.choice(MATERIALS)} {rng.choice(PRODUCTS)}",
            "warehouse": rng.choice(CITIES), "quantity": rng.randint(0, 480), "bin": draw_code(rng, "LD-DD-L")}


def shipment_record(rng: random.Random) -> Record:
    """One shipment: where from and to, when, by which carrier, its weight and its tracking code."""
    origin, destination = rng.sample(CITIES, 2)
    shipped = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return {"shipment_id": draw_code(rng, "SHDDDDDD"), "shipped": shipped, "origin": origin,
            "destination": destination, "carrier": rng.choice(CARRIERS), "weight_kg": f"{rng.uniform(0.2, 40):.1f}",
            "tracking_code": draw_code(rng, "LL-DDDD-LL")}


@dataclass(frozen=True)
class Table:
    """A kind of record: how one is drawn, the field that names it (`key`) and the field a question asks (`asked`)."""

    draw: Callable[[random.Random], Record]
    key: str
    asked: str

    def filler(self, salt: int, size: int, needle: Record) -> list[Record]:
        """`size` records drawn in order from Random(salt), skipping any that shows the needle's key or asked value."""
        rng, shown = random.Random(salt), (str(needle[self.key]), str(needle[self.asked]))
        records: list[Record] = []
        while len(records) < size:
            record = self.draw(rng)
            if not any(s in str(v) for s in shown for v in record.values()):
                records.append(record)
        return records

    def rows(self, needle: Record, salt: int, size: int, depth: float, render: Callable[[Record], str]) -> list[str]:
        """The rendered filler of `size` records with the needle record inserted at fractional `depth`."""
        return insert_at_depths([render(r) for r in self.filler(salt, size, needle)], [render(needle)], [depth])


INVENTORY = Table(inventory_record, key="sku", asked="bin")
SHIPMENTS = Table(shipment_record, key="shipment_id", asked="tracking_code")
