"""An offline English text corpus for distilling and calibrating sentence encoders.

Two sources, both on every machine that has the library, nothing downloaded:

* prose from the Python reference documentation that CPython itself ships
  (``pydoc_data.topics``, the text behind ``help("if")``): technical
  English sentences (about 850 after filtering);
* everyday sentences generated here from a small grammar (subjects, verbs,
  objects, places, times, questions and numbers), deterministic in ``seed``.

The grammar's words are chosen apart from the evaluation sentences of the
test suite, so a model distilled on this corpus is evaluated on text it did
not see.
"""

from __future__ import annotations

import random
import re

_PEOPLE = [
    "my sister",
    "the pilot",
    "a nurse",
    "the farmer",
    "our teacher",
    "the mayor",
    "a tourist",
    "the baker",
    "her grandfather",
    "the students",
    "a journalist",
    "the doctor",
    "his roommate",
    "the coach",
    "a child",
    "the lawyer",
    "two musicians",
    "the gardener",
    "a scientist",
    "the waiter",
    "my colleagues",
    "the driver",
]
_ACTIONS = [
    "bought",
    "cleaned",
    "forgot",
    "borrowed",
    "painted",
    "sold",
    "carried",
    "described",
    "ordered",
    "fixed",
    "photographed",
    "delivered",
    "measured",
    "cooked",
    "found",
    "returned",
    "designed",
    "opened",
    "lost",
    "planted",
    "translated",
    "recorded",
    "checked",
    "wrapped",
]
_THINGS = [
    "a red umbrella",
    "the kitchen table",
    "fresh bread",
    "an old map",
    "the garden fence",
    "a wooden boat",
    "the train tickets",
    "a letter from Spain",
    "the heavy boxes",
    "a cup of tea",
    "the soccer ball",
    "a silver ring",
    "the broken window",
    "three apples",
    "the winter coat",
    "a new laptop",
    "the violin",
    "a bunch of flowers",
    "the car keys",
    "a mountain bike",
    "the paperwork",
    "a jar of honey",
]
_PLACES = [
    "at the market",
    "in the park",
    "near the river",
    "at the airport",
    "in the library",
    "on the beach",
    "at the hospital",
    "in the village",
    "at the station",
    "in the office",
    "on the farm",
    "downtown",
]
_TIMES = [
    "yesterday",
    "this morning",
    "last winter",
    "on Sunday",
    "after lunch",
    "every week",
    "at midnight",
    "before the storm",
    "during the holidays",
    "two days ago",
]
_TOPICS = [
    "the weather",
    "climate change",
    "the football match",
    "a new restaurant",
    "the election",
    "space travel",
    "healthy food",
    "the housing market",
    "electric cars",
    "the history of Rome",
    "modern art",
    "the economy",
]
_FEELINGS = ["happy", "tired", "worried", "excited", "surprised", "angry", "calm", "nervous", "proud", "bored"]


def generated_sentences(count: int, *, seed: int = 0) -> list[str]:
    """``count`` distinct everyday sentences from the grammar, deterministic in ``seed``.

    Example:
        >>> generated_sentences(2, seed=1) == generated_sentences(2, seed=1)
        True
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(seed)
    shapes = [
        lambda: (
            f"{rng.choice(_PEOPLE).capitalize()} {rng.choice(_ACTIONS)} {rng.choice(_THINGS)} {rng.choice(_PLACES)}."
        ),
        lambda: (
            f"{rng.choice(_TIMES).capitalize()}, {rng.choice(_PEOPLE)} {rng.choice(_ACTIONS)} {rng.choice(_THINGS)}."
        ),
        lambda: f"Why did {rng.choice(_PEOPLE)} leave {rng.choice(_THINGS)} {rng.choice(_PLACES)}?",
        lambda: f"{rng.choice(_PEOPLE).capitalize()} talked about {rng.choice(_TOPICS)} {rng.choice(_TIMES)}.",
        lambda: f"Everyone {rng.choice(_PLACES)} felt {rng.choice(_FEELINGS)} about {rng.choice(_TOPICS)}.",
        lambda: f"{rng.choice(_PEOPLE).capitalize()} paid {rng.randint(2, 990)} euros for {rng.choice(_THINGS)}.",
        lambda: (
            f"Is it true that {rng.choice(_PEOPLE)} {rng.choice(_ACTIONS)} {rng.choice(_THINGS)} {rng.choice(_TIMES)}?"
        ),
        lambda: (
            f"I was {rng.choice(_FEELINGS)} when {rng.choice(_PEOPLE)} {rng.choice(_ACTIONS)} {rng.choice(_THINGS)}."
        ),
    ]
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(rng.choice(shapes)(), None)
    return list(seen)


def documentation_sentences() -> list[str]:
    """Prose sentences from CPython's bundled reference documentation (``pydoc_data.topics``); ``[]`` if stripped."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    found: dict[str, None] = {}
    for paragraph in re.split(r"\n\s*\n", "\n".join(topics[k] for k in sorted(topics))):
        if paragraph.startswith((" ", "\t")) or ">>>" in paragraph:  # code examples
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sentence[-1] in ".!?" and not re.search(r"[*=_{}\[\]<>|`]", sentence):
                found.setdefault(sentence, None)
    return list(found)


def text_corpus(size: int = 4000, *, seed: int = 0) -> list[str]:
    """``size`` sentences: the documentation prose (all of it, up to half of ``size``), the rest generated, shuffled.

    Example:
        >>> corpus = text_corpus(100)
        >>> len(corpus), len(set(corpus))
        (100, 100)
    """
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    docs = documentation_sentences()[: size // 2]
    corpus = docs + generated_sentences(size - len(docs), seed=seed)
    random.Random(seed).shuffle(corpus)
    return corpus
