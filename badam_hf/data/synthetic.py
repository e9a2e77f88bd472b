"""The demo's own instruction data: six small learnable tasks (arithmetic and word tasks), generated from a
seed, so the embedded default needs no download."""

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
