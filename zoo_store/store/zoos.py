"""Zoos that ``zoo models build NAME`` trains into the store (never ``zoo serve``'s first start):
the demo zoo, and the complementary zoo, whose families each know another domain.

The complementary zoo: four families of ``archs.small``, each pretrained on its own domain (digits,
letters, shapes, textures), each at two widths; one input spec (1 x 28 x 28, the MNIST
normalization) for all, so that clone and reassembly can combine what they know. The recipe
(images per label, epochs, learning rate) is fixed in advance, the same for every base; the test
split is read once, for the accuracy on the card.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zoo_store.core.cards import Card
from zoo_store.store.db import DEMO_ZOO_LOCK_KEY
from zoo_store.store.demo import DEMO_BASES, DemoBase, ensure_bases
from zoo_store.store.store import Store


@dataclass(frozen=True)
class Family:
    """One family of the complementary zoo: an architecture, its two widths, and its domain."""

    name: str  # in the bases' ids
    arch: str
    narrow: dict[str, Any]  # arch_config of the narrow member
    wide: dict[str, Any]  # arch_config of the wide member (the arch's default widths)
    dataset: str  # the domain's built-in dataset
    domain: str  # said on the card
    per_label: int  # training images per label


EPOCHS = 3  # fixed in advance for every base of the complementary zoo

# a quarter and half the default widths of resnet_s, vgg_s and convnext_s (mobilenet_s: half and its default)
NARROW, WIDE = {"widths": [8, 16, 32]}, {"widths": [16, 32, 64]}

FAMILIES = (
    Family("resnet", "resnet_s", NARROW, WIDE, "letters", "letters (capital A-Z)", 400),
    Family(
        "mobilenet",
        "mobilenet_s",
        {**NARROW, "last": 64},
        {**WIDE, "last": 128},
        "mnist",
        "digits (MNIST 0-9)",
        300,
    ),
    Family("vgg", "vgg_s", NARROW, WIDE, "shapes", "shapes (10 kinds, filled or outlined)", 400),
    Family(
        "convnext", "convnext_s", NARROW, WIDE, "textures", "textures (gratings: 6 orientations x 3 frequencies)", 300
    ),
)


def family_bases(f: Family, epochs: int = EPOCHS) -> tuple[DemoBase, ...]:
    """The family's narrow and wide members, ids ``<domain dataset>-<family>-<width>``."""
    return tuple(
        DemoBase(
            f"{f.dataset}-{f.name}-{width}",
            f.arch,
            f.dataset,
            f"{f.arch} ({width}: widths {'-'.join(map(str, config['widths']))}) pretrained on {f.domain}",
            epochs=epochs,
            config=config,
            per_label=f.per_label,
        )
        for width, config in (("narrow", f.narrow), ("wide", f.wide))
    )


COMPLEMENTARY_BASES = tuple(b for f in FAMILIES for b in family_bases(f))


@dataclass(frozen=True)
class Zoo:
    bases: tuple[DemoBase, ...]
    what: str  # in progress lines and descriptions


ZOOS: dict[str, Zoo] = {
    "demo": Zoo(DEMO_BASES, "demo zoo"),
    "complementary": Zoo(COMPLEMENTARY_BASES, "complementary zoo"),
}


def build_zoo(store: Store, name: str, samples: int, say: Callable[[str], None] = print) -> list[Card]:
    """Train and register the bases of zoo ``name`` that the store lacks (one process at a time,
    like the demo zoo at a server's first start); returns the cards it registered: none once built."""
    zoo = ZOOS[name]
    start = time.perf_counter()
    with store.db.exclusive(DEMO_ZOO_LOCK_KEY):
        made = ensure_bases(store, zoo.bases, samples, say, what=zoo.what)
    if made:
        say(f"{zoo.what}: trained {len(made)} bases in {(time.perf_counter() - start) / 60:.1f} min")
    else:
        say(f"{zoo.what}: already built, nothing to do ({len(zoo.bases)} bases in the store)")
    return made


def markdown_table(store: Store, name: str) -> str:
    """The zoo's bases as a markdown table: id, architecture, widths, parameters, domain and the
    accuracy on the domain's test split (from the cards in the store)."""
    cards = store.cards()
    rows = [
        "| base | arch | widths | params | trained on | test accuracy (own domain) |",
        "|---|---|---|---:|---|---:|",
    ]
    for b in ZOOS[name].bases:
        card = cards.get(b.id)
        if card is None:
            continue
        widths = "-".join(map(str, card.arch_config.get("widths", ["default"])))
        rows.append(
            f"| {b.id} | {b.arch} | {widths} | {card.num_params:,} | {b.dataset} "
            f"({card.metrics.get('train_samples', 0):,.0f} train images) | {card.metrics['accuracy']:.4f} |"
        )
    return "\n".join(rows)
