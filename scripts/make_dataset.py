"""Generate molora's bundled multi-task instruction dataset (``molora/data/tasks_{train,eval}.jsonl``).

Deterministic: the same files come out on every run (``python scripts/make_dataset.py``). Six small tasks whose
answers are short and checkable by exact match; every task has a held-out split whose *inputs* never appear in
training (different numbers, words or countries), so exact match on it measures what the adapter learned about the
task and its answer format, not memorised rows. Rows are conversational prompt/completion pairs plus a ``task``
field::

    {"task": "capital", "prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", ...}]}

TRL trains on the completion only; ``molora eval`` reports loss and exact match per task.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "molora" / "data"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam", "India": "New Delhi",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Argentina": "Buenos Aires", "Colombia": "Bogota",
    "Hungary": "Budapest", "Czechia": "Prague", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ghana": "Accra",
    "Indonesia": "Jakarta", "Philippines": "Manila", "South Korea": "Seoul", "Australia": "Canberra",
    "New Zealand": "Wellington", "Brazil": "Brasilia", "Venezuela": "Caracas", "Nigeria": "Abuja",
}  # fmt: skip
WORDS = (
    "apple river stone cloud tiger lemon piano garden rocket candle forest window silver pencil market island "
    "orange bridge dragon violin meadow castle planet harbor jungle camera spider button mirror basket winter "
    "summer autumn spring ocean desert valley canyon rabbit falcon turtle salmon cherry banana carrot pepper "
    "tomato honey butter cookie"
).split()


def _split(items: list, n_eval: int, rng: random.Random) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    return items[n_eval:], items[:n_eval]


def _row(task: str, question: str, answer: str) -> dict:
    return {
        "task": task,
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def build(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) rows: ``n_train`` and ``n_eval`` per task, disjoint inputs."""
    rng = random.Random(seed)
    train: list[dict] = []
    held: list[dict] = []

    # capitals: held-out countries are never seen in training
    countries_train, countries_eval = _split(sorted(CAPITALS), 10, rng)
    for split, pool, n in ((train, countries_train, n_train), (held, countries_eval, min(n_eval, 10))):
        for i in range(n):
            country = pool[i % len(pool)]
            split.append(_row("capital", f"What is the capital of {country}?", CAPITALS[country]))

    # two-digit addition: held-out pairs never seen in training
    pairs = [(a, b) for a in range(10, 60) for b in range(10, 60)]
    pairs_train, pairs_eval = _split(pairs, n_eval, rng)
    for split, pool, n in ((train, pairs_train, n_train), (held, pairs_eval, n_eval)):
        for a, b in pool[:n]:
            split.append(_row("add", f"What is {a} + {b}?", str(a + b)))

    # the word-level tasks draw from disjoint vocabularies
    words_train, words_eval = _split(WORDS, 14, rng)
    generators = {
        "uppercase": lambda ws: (f"Write in uppercase: {' '.join(ws[:2])}", " ".join(ws[:2]).upper()),
        "reverse": lambda ws: (f"Reverse the order of the words: {' '.join(ws[:3])}", " ".join(reversed(ws[:3]))),
        "sort": lambda ws: (f"Sort alphabetically: {', '.join(ws[:3])}", ", ".join(sorted(ws[:3]))),
        "first_letters": lambda ws: (
            f"Give the first letter of each word: {' '.join(ws[:4])}",
            "".join(w[0] for w in ws[:4]),
        ),
    }
    for task, make in generators.items():
        for split, pool, n in ((train, words_train, n_train), (held, words_eval, n_eval)):
            seen: set[str] = set()
            while len(seen) < n:
                question, answer = make(rng.sample(pool, 4))
                if question in seen:
                    continue
                seen.add(question)
                split.append(_row(task, question, answer))
    rng.shuffle(train)
    return train, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=200, help="training rows per task")
    parser.add_argument("--n-eval", type=int, default=16, help="held-out rows per task")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    train, held = build(args.n_train, args.n_eval)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tasks_train.jsonl", train), ("tasks_eval.jsonl", held)):
        with open(args.out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
