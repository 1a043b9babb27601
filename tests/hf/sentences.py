"""A deterministic, varied set of test sentences (generated here: no download)."""

import itertools

SUBJECTS = [
    "A man",
    "The children",
    "My neighbour's cat",
    "The committee",
    "A young programmer",
    "Two old friends",
    "The orchestra",
    "An engineer from Oslo",
]
VERBS = [
    "is eating",
    "reviewed",
    "will repair",
    "has been painting",
    "quietly watched",
    "argued about",
    "cannot find",
    "laughed at",
]
OBJECTS = [
    "a bowl of noodles.",
    "the quarterly budget!",
    "the broken bicycle?",
    "a portrait of the sea",
    "the new compiler release",
    "an old photograph",
    "the evening news",
    "the rules of chess",
]
EXTRAS = [
    "What time does the train to Paris leave?",
    "Prices rose 3.7% in March, the fastest pace since 2019.",
    "def add(a, b): return a + b  # a tiny Python function",
    "Ünïcödé, émojis 🙂 and symbols like ±, €, ∑ are still text.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "no punctuation at all just words running on and on",
    "Tokyo, Lagos, São Paulo and Reykjavík are cities.",
    "I love this movie. I hate this movie.",
    "Call 555-0100 or write to help@example.com.",
    "Photosynthesis converts light energy into chemical energy.",
]


def minilm_sentences(count: int = 240) -> list[str]:
    """``count`` sentences: templated ones, hand-written edge cases, and one longer than 256 tokens."""
    templated = [f"{s} {v} {o}" for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    step = max(1, len(templated) // (count - len(EXTRAS) - 1))
    chosen = templated[::step][: count - len(EXTRAS) - 1]
    long_line = " ".join(f"word{i} and the {OBJECTS[i % len(OBJECTS)]}" for i in range(120))  # truncated at 256
    return [*EXTRAS, long_line, *chosen]
