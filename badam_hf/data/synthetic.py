"""The demos' own instruction data, generated from a seed so nothing is downloaded: six small learnable tasks
for the tiny from-scratch demo (`make_synthetic_records`), and dates in words for the real-model demo
(`make_date_records`), a task SmolLM2-135M-Instruct does not do before fine-tuning (it echoes the date)."""

from __future__ import annotations

import random

WORDS = (
    "cat dog sun map pen cup hat box fox owl bee ant car bus key jar web ink oak elm "
    "lamp frog bird fish tree rock leaf wind rain snow moon star ship boat road door "
    "apple river stone cloud green piano tiger lemon honey robot"
).split()


def make_synthetic_records(n: int = 400, seed: int = 0) -> list[dict]:
    """`n` instruction records over six small learnable tasks; the same seed gives the same records."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        task = i % 6
        w = rng.choice(WORDS)
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if task == 0:
            rec = {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"}
        elif task == 1:
            a, b = max(a, b), min(a, b)
            rec = {"instruction": f"Subtract {b} from {a}.", "input": "", "output": f"{a} - {b} = {a - b}"}
        elif task == 2:
            rec = {"instruction": "Reverse the word.", "input": w, "output": w[::-1]}
        elif task == 3:
            rec = {"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()}
        elif task == 4:
            rec = {"instruction": f"How many letters are in the word {w}?", "input": "", "output": str(len(w))}
        else:
            v = rng.choice(WORDS)
            rec = {"instruction": "Join the two words with a dash.", "input": f"{w} {v}", "output": f"{w}-{v}"}
        records.append(rec)
    return records


MONTHS = ("January February March April May June July August September October November December").split()
DATE_INSTRUCTION = "Write this date in words."


def make_date_records(n: int, seed: int = 0, exclude: set | None = None) -> list[dict]:
    """`n` records of one task: an ISO date (1950-2049) in, the date in words out ("2019-11-23" ->
    "November 23, 2019"). Distinct dates, none of `exclude` (a set of ISO strings), so a held-out set made
    with another seed and `exclude=` the training dates shares no date with it. Same seed, same records."""
    import datetime

    rng = random.Random(seed)
    taken = set(exclude or ())
    records: list[dict] = []
    start = datetime.date(1950, 1, 1)
    while len(records) < n:
        day = start + datetime.timedelta(days=rng.randrange(100 * 365))
        iso = day.isoformat()
        if iso in taken:
            continue
        taken.add(iso)
        records.append({"instruction": DATE_INSTRUCTION, "input": iso,
                        "output": f"{MONTHS[day.month - 1]} {day.day}, {day.year}"})
    return records
