"""Routing classifier: accuracy on the labelled set, confusion matrix, classifications per second.

    python bench/routing.py [--data tests/data/routing.jsonl] [--split all|dev|holdout] [--seconds 2] [--errors]

The data set (`tests/data/routing.jsonl`) is one labelled request a line: a plain prompt or
an OpenAI body, with its expected category and a `split` — `dev` rows were looked at while
the default rules were written, `holdout` rows were not. Speed is measured on one core
(this process, one thread, in CPU time) by classifying every row of the set over and over for at least
`--seconds`, with the default rules. Target: ≥ 90% accuracy, ≥ 20,000 classifications/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.core.routing import Classifier
from specs.enums import Category

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "routing.jsonl"


def load(path: Path, split: str = "all") -> list[dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split == "all" or r.get("split") == split]


def confusion(rows: list[dict[str, object]], classifier: Classifier) -> tuple[dict[tuple[str, str], int], list[str]]:
    matrix: dict[tuple[str, str], int] = {}
    errors: list[str] = []
    for row in rows:
        got = classifier.classify(row["request"])
        want = str(row["category"])
        matrix[want, got.category.value] = matrix.get((want, got.category.value), 0) + 1
        if got.category.value != want:
            text = json.dumps(row["request"], ensure_ascii=False)[:110]
            errors.append(f"  want {want:6} got {got.category.value:6} {', '.join(got.signals)[:80]}\n      {text}")
    return matrix, errors


def print_matrix(matrix: dict[tuple[str, str], int]) -> None:
    cats = [c.value for c in Category]
    print("expected \\ got " + "".join(f"{c:>8}" for c in cats) + "   recall")
    for want in cats:
        row = [matrix.get((want, got), 0) for got in cats]
        total = sum(row)
        recall = f"{100 * matrix.get((want, want), 0) / total:6.1f}%" if total else "     -"
        print(f"{want:14} " + "".join(f"{n:8d}" for n in row) + f"  {recall}")


def accuracy(matrix: dict[tuple[str, str], int]) -> tuple[int, int]:
    right = sum(n for (want, got), n in matrix.items() if want == got)
    return right, sum(matrix.values())


def speed(requests: list[object], classifier: Classifier, seconds: float, rounds: int = 5) -> float:
    """Classifications per CPU second of this process (one thread, so one core): the median of
    `rounds` rounds of `seconds` / `rounds` each. CPU time, not wall time, so that other jobs on a
    shared machine do not count against it (they still slow caches down)."""
    rates: list[float] = []
    for _ in range(rounds):
        done = 0
        start = time.process_time()
        while True:
            for request in requests:
                classifier.classify(request)
            done += len(requests)
            elapsed = time.process_time() - start
            if elapsed >= seconds / rounds:
                break
        rates.append(done / elapsed)
    return statistics.median(rates)


def is_text(request: object) -> bool:
    """A request the rules have to read (not an embeddings body, no image)."""
    return not (isinstance(request, dict) and ("input" in request or '"image' in json.dumps(request)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--split", choices=["all", "dev", "holdout"], default="all")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--errors", action="store_true", help="list the misclassified requests")
    args = ap.parse_args()
    classifier = Classifier.from_spec()
    rows = load(args.data, args.split)
    splits = ["all", "dev", "holdout"] if args.split == "all" else [args.split]
    print(f"routing classifier, default rules, {args.data.name}")
    print(f"{'split':8} {'rows':>5} {'right':>6} {'accuracy':>9}")
    for split in splits:
        part = [r for r in rows if split == "all" or r.get("split") == split]
        right, total = accuracy(confusion(part, classifier)[0])
        print(f"{split:8} {total:5d} {right:6d} {100 * right / total if total else 0:8.1f}%")
    matrix, errors = confusion(rows, classifier)
    print()
    print_matrix(matrix)
    if args.errors and errors:
        print("\nmisclassified:")
        print("\n".join(errors))
    requests = [r["request"] for r in rows]
    text = [r for r in requests if is_text(r)]
    paste = (
        "Why does this fail?\n```python\n"
        + "\n".join(f"def f{i}(x):\n    return x.get('k{i}') + {i}  # see utils.py:{i}" for i in range(40))
        + "\n```"
    )
    print(f"\nclassifications per CPU second, one core (median of 5 rounds, {args.seconds:g} s in all each):")
    batches: list[tuple[str, list[object]]] = [
        ("every row", requests),
        ("text rows (no image, no embeddings)", text),
        ("a 2 KB code paste", [paste]),
    ]
    for name, batch in batches:
        mean = sum(len(json.dumps(r)) for r in batch) / len(batch)
        print(f"  {name:38} {speed(batch, classifier, args.seconds):10,.0f}   (mean {mean:,.0f} characters)")


if __name__ == "__main__":
    main()
