"""Synthetic multi-task federation: the default data of ``fedsilo simulate`` (no files).

Design (why each choice):

- Learnable by a tiny model. The built-in backbone is a random-init byte-level transformer
  (d_model 64, 2 layers) of which only q/v LoRA adapters train, for a few hundred Adam steps.
  So prompts are short (< 32 bytes), end with a newline, and put the deciding word last, right
  before the answer. Within a family, the deciding words of different classes differ in their
  first byte (and, for sentiment and colour, in their last byte too), so a single byte already
  separates the classes.
- One candidate set for every family: ``good``, ``bad``, ``warm``, ``cool`` (distinct first
  bytes), so candidate scoring is uniform across silos; each family answers with a subset.
- Four families:
    * ``sentiment``: ``review: film was great`` -> good / bad by the adjective;
    * ``irony``: the *same* prompts as sentiment with the labels flipped;
    * ``colour``: ``colour: car is amber`` -> warm / cool by the colour;
    * ``topic``: ``topic: gift`` -> good / bad / warm / cool from four small lexicons.
- Personalisation matters: sentiment and irony share their inputs exactly, so no single model
  can answer both; a silo's best model follows whichever of the two dominates its mix. colour
  and topic agree everywhere, so collaboration helps there.
- Heterogeneous silos: silo i's mix over families is Dirichlet(``skew``) drawn from a generator
  seeded with (seed, i): smaller ``skew`` -> more skewed mixes. It depends on the seed and the
  silo index only (not on ``num_silos`` or ``examples_per_silo``).
- ``Example.group`` is ``family:label`` (e.g. ``irony:bad``) for partition bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .examples import DataError, Example, TaskInfo

CANDIDATES: tuple[str, ...] = ("good", "bad", "warm", "cool")

_POSITIVE = ("great", "lovely", "superb", "fine", "happy")  # first g l s f h, last t y b e
_NEGATIVE = ("awful", "boring", "dull", "poor", "weak")  # first a b d p w, last l g r k
_WORKS = ("film", "book", "meal", "show", "song", "game")
_WARM = ("red", "amber", "yellow", "orange", "scarlet")  # first r a y o s, last d r w e t
_COOL = ("navy", "cyan", "teal", "green", "indigo")  # first n c t g i, last y n l n o
_THINGS = ("car", "cup", "hat", "wall", "door", "kite")
_TOPIC = {  # the 16 words start with 16 different bytes
    "good": ("gift", "party", "hug", "joy"),
    "bad": ("debt", "crash", "theft", "loss"),
    "warm": ("fire", "sun", "oven", "beach"),
    "cool": ("ice", "rain", "winter", "night"),
}


@dataclass(frozen=True)
class _Family:
    name: str
    # (prompt, label) choices; one is drawn uniformly per example
    items: tuple[tuple[str, str], ...]


def _review_items(flip: bool) -> tuple[tuple[str, str], ...]:
    pos, neg = ("bad", "good") if flip else ("good", "bad")
    return tuple(
        (f"review: {work} was {adj}\n", pos if adj in _POSITIVE else neg)
        for work in _WORKS
        for adj in (*_POSITIVE, *_NEGATIVE)
    )


FAMILIES: tuple[_Family, ...] = (
    _Family("sentiment", _review_items(flip=False)),
    _Family("irony", _review_items(flip=True)),
    _Family(
        "colour",
        tuple(
            (f"colour: {thing} is {colour}\n", "warm" if colour in _WARM else "cool")
            for thing in _THINGS
            for colour in (*_WARM, *_COOL)
        ),
    ),
    _Family(
        "topic",
        tuple((f"topic: {word}\n", label) for label, words in _TOPIC.items() for word in words),
    ),
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)


def family_mix(silo: int, seed: int, skew: float = 0.3) -> np.ndarray:
    """Silo ``silo``'s proportions over `FAMILY_NAMES` ~ Dirichlet(skew), fixed by (seed, silo)."""
    if skew <= 0:
        raise DataError(f"skew is a Dirichlet concentration and must be > 0, got {skew}")
    return np.random.default_rng([seed, silo, 0]).dirichlet(np.full(len(FAMILIES), skew))


def synthetic_federation(
    num_silos: int, seed: int, examples_per_silo: int = 300, skew: float = 0.3
) -> tuple[list[list[Example]], TaskInfo]:
    """Per silo, ``examples_per_silo`` examples drawn from its family mix; one shared task."""
    if num_silos < 1:
        raise DataError(f"num_silos must be at least 1, got {num_silos}")
    if examples_per_silo < 1:
        raise DataError(f"examples_per_silo must be at least 1, got {examples_per_silo}")
    silos: list[list[Example]] = []
    for silo in range(num_silos):
        rng = np.random.default_rng([seed, silo, 1])
        counts = rng.multinomial(examples_per_silo, family_mix(silo, seed, skew))
        examples: list[Example] = []
        for family, count in zip(FAMILIES, counts, strict=True):
            for k in rng.integers(len(family.items), size=count):
                prompt, label = family.items[k]
                examples.append(Example(prompt, label, f"{family.name}:{label}"))
        silos.append([examples[i] for i in rng.permutation(len(examples))])
    return silos, TaskInfo("classification", CANDIDATES, "synthetic")
