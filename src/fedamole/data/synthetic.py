"""Built-in synthetic multi-task instruction data: the offline default source.

Every family has short answers that are checkable by recomputation, so a small model can learn
them in a few dozen steps and a test can verify them. Inputs are unique within a family, so no
test input also appears in training.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from dataclasses import dataclass

from fedamole.data.example import DataError, Example

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_UNITS = {
    "km": ("m", 1000),
    "kg": ("g", 1000),
    "m": ("cm", 100),
    "h": ("min", 60),
    "L": ("mL", 1000),
}
_SUBJECTS = (
    "Maria",
    "The old man",
    "My neighbour",
    "Our class",
    "The tourists",
    "Tom",
    "A young girl",
    "The farmer",
    "Grandma",
    "The students",
)
_TIMES = (
    "yesterday",
    "this morning",
    "last weekend",
    "on Monday",
    "at noon",
    "in the evening",
    "last summer",
    "today",
)
_TOPIC_PHRASES = {
    "sports": (
        "scored twice in the final",
        "won the tennis match",
        "ran the marathon",
        "missed a penalty kick",
        "trained with the basketball team",
        "broke the swimming record",
        "hit a home run",
        "finished the cycling race",
        "caught the winning pass",
        "lifted the heavy barbell",
    ),
    "food": (
        "baked a loaf of bread",
        "cooked spicy noodles",
        "ordered a pepperoni pizza",
        "tasted the lemon cake",
        "made a bowl of soup",
        "grilled fresh salmon",
        "peeled ripe mangoes",
        "ate a cheese omelette",
        "fried some dumplings",
        "mixed a fruit salad",
    ),
    "weather": (
        "got soaked by heavy rain",
        "watched the snow fall",
        "felt the strong wind",
        "saw thunder clouds gather",
        "sweated in the heat wave",
        "waited out the hailstorm",
        "saw thick fog roll in",
        "enjoyed the sunny sky",
        "shivered in the frost",
        "saw a rainbow after the storm",
    ),
}

Generator = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class _Task:
    instruction: str
    generate: Generator
    choices: tuple[str, ...] | None = None


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word (2-3 consonant-vowel syllables): a large pool, few tokens."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"{a} + {b}", str(a + b)
    return f"{a} - {b}", str(a - b)


def _sort_list(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), 4)
    return ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _reverse_word(rng: random.Random) -> tuple[str, str]:
    word = _pseudo_word(rng)
    return word, word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = _pseudo_word(rng)
    return word, word.upper()


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    unit = rng.choice(sorted(_UNITS))
    target, factor = _UNITS[unit]
    value = rng.randint(1, 99)
    return f"{value} {unit}", f"{value * factor} {target}"


def _date_format(rng: random.Random) -> tuple[str, str]:
    start = datetime.date(2000, 1, 1).toordinal()
    day = datetime.date.fromordinal(rng.randint(start, datetime.date(2030, 12, 31).toordinal()))
    return day.isoformat(), day.strftime("%d/%m/%Y")


def _keyword_classification(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(_TOPIC_PHRASES))
    phrase = rng.choice(_TOPIC_PHRASES[topic])
    return f"{rng.choice(_SUBJECTS)} {phrase} {rng.choice(_TIMES)}.", topic


def _parity(rng: random.Random) -> tuple[str, str]:
    number = rng.randint(1, 999)
    return str(number), "even" if number % 2 == 0 else "odd"


TASKS: dict[str, _Task] = {
    "arithmetic": _Task("Compute the result of the expression.", _arithmetic),
    "sort_list": _Task("Sort the numbers in ascending order.", _sort_list),
    "reverse_word": _Task("Write the word backwards, letter by letter.", _reverse_word),
    "uppercase": _Task("Rewrite the word in capital letters.", _uppercase),
    "unit_conversion": _Task(
        "Convert the quantity to the smaller unit (km to m, kg to g, m to cm, h to min, L to mL).",
        _unit_conversion,
    ),
    "date_format": _Task(
        "Rewrite the date from YYYY-MM-DD format to DD/MM/YYYY format.", _date_format
    ),
    "keyword_classification": _Task(
        "Classify the topic of the sentence. Answer with one word: food, sports or weather.",
        _keyword_classification,
        tuple(sorted(_TOPIC_PHRASES)),
    ),
    "parity": _Task("Is the number even or odd? Answer with one word.", _parity, ("even", "odd")),
}


def _unique_pairs(name: str, task: _Task, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """Draw `count` distinct inputs; a bounded number of draws so an exhausted pool fails loudly."""
    pairs: dict[str, str] = {}
    for _ in range(50 * count + 1000):
        if len(pairs) == count:
            return list(pairs.items())
        question, answer = task.generate(rng)
        pairs.setdefault(question, answer)
    raise DataError(
        f"synthetic task {name!r} has fewer than {count} distinct examples; "
        "lower data.synthetic_per_task"
    )


def generate_synthetic(per_task: int, seed: int, tasks: list[str] | None = None) -> list[Example]:
    """`per_task` examples of each family (all families by default), label = family name.

    Each family has its own random stream, so the examples of one family do not depend on which
    other families are requested.
    """
    names = list(TASKS) if tasks is None else tasks
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise DataError(f"unknown synthetic task(s) {unknown}; known: {sorted(TASKS)}")
    examples = []
    for name in names:
        task = TASKS[name]
        rng = random.Random(f"{seed}:{name}")
        for question, answer in _unique_pairs(name, task, per_task, rng):
            examples.append(
                Example(task.instruction, question, answer, name, task.choices, source="synthetic")
            )
    return examples
