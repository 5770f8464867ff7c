"""Write bench/eval/e2e_mc.jsonl: a multiple-choice task made from the E2E NLG dev set.

    .venv/bin/python bench/eval/make_e2e_mc.py

Each item is one meaning representation as the table prompt prefix-serve trains on
(server.training.data.table_prompt), its first human reference as the right answer, and
three references written for other meaning representations of the same restaurant (same
`name`, other attributes) as the wrong ones: a model has to read the table, not the name.
Items are drawn with a fixed seed. The E2E data is CC BY-SA 4.0 (Novikova, Dušek, Rieser
2017); so is this file derived from it.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from server.training.data import parse_mr, table_prompt  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
OUT = Path(__file__).with_name("e2e_mc.jsonl")
ITEMS, CHOICES, SEED = 100, 4, 0


def main() -> None:
    refs: dict[str, list[str]] = {}
    with open(SOURCE, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            refs.setdefault(row["mr"], []).append(row["ref"].strip())
    by_name: dict[str, list[str]] = {}
    for mr in refs:
        by_name.setdefault(dict(parse_mr(mr))["name"], []).append(mr)
    rng = random.Random(SEED)
    mrs = [mr for mr in refs if len(by_name[dict(parse_mr(mr))["name"]]) >= CHOICES]
    rng.shuffle(mrs)
    with open(OUT, "w", encoding="utf-8") as out:
        for mr in mrs[:ITEMS]:
            others = [m for m in by_name[dict(parse_mr(mr))["name"]] if m != mr]
            wrong = [refs[m][0] for m in rng.sample(others, CHOICES - 1)]
            choices = wrong + [refs[mr][0]]
            rng.shuffle(choices)
            out.write(json.dumps({"prompt": table_prompt(mr), "choices": choices,
                                  "gold": choices.index(refs[mr][0])}, ensure_ascii=False) + "\n")
    print(f"wrote {ITEMS} items to {OUT}")


if __name__ == "__main__":
    main()
