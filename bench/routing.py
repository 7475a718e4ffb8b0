"""Routing classifier: accuracy per labelled set (rules only and rules + embedding), recall, speed.

    python bench/routing.py [--embed none|minilm|synthetic|URL#MODEL] [--seconds 2] [--errors] [--folds 5]

Sets: `tune` (the built-in examples, `controller/core/routing_examples.jsonl`: the rules, the
confidence threshold, k and the vote were tuned on it), `holdout1` (written with it, never
looked at while tuning), `holdout2` (written separately, in another style), `holdout3` (written
separately, in eight languages and every request shape; recall per language too), and `legacy`
(`tests/data/routing.jsonl`, the older set). The two-stage figure on `tune` is 5-fold
cross-validation (stratified by category, `--seed`): each request's neighbours come from the
other four folds only; the other sets use every built-in example. `by rules` / `by emb` count
which stage decided (rules: sure, or the embedding stage had no answer).

`--embed minilm` (default) serves all-MiniLM-L6-v2 (tests/support/minilm.py) with the real
llama-server; `synthetic` the lab's synthetic embed GGUF (random weights); `URL#MODEL` any
OpenAI-compatible /v1 base. Speed: rules only, classifications per CPU second of this
process (one thread), median of 5 rounds. Targets: >= 95% on each held-out set, no category
below 90% recall, >= 20,000 classifications per CPU second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.core import classifier as core
from controller.core.routing import Classifier, all_examples
from specs.enums import Category

ROOT = Path(__file__).resolve().parent.parent
SETS = {
    "tune": ROOT / "controller" / "core" / "routing_examples.jsonl",
    "holdout1": ROOT / "tests" / "data" / "routing_holdout1.jsonl",
    "holdout2": ROOT / "tests" / "data" / "routing_holdout2.jsonl",
    "holdout3": ROOT / "tests" / "data" / "routing_holdout3.jsonl",
    "legacy": ROOT / "tests" / "data" / "routing.jsonl",
}


def load(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def memo(embed: core.Embedder) -> core.Embedder:
    """`embed`, asked once per text (the cross-validation folds share the examples' vectors)."""
    seen: dict[str, list[float]] = {}

    def embed_once(texts: Sequence[str], timeout: float) -> list[list[float]]:
        missing = [t for t in dict.fromkeys(texts) if t not in seen]
        if missing:
            seen.update(zip(missing, embed(missing, timeout), strict=True))
        return [seen[t] for t in texts]

    return embed_once


def folds(rows: Sequence[dict[str, object]], n: int, seed: int) -> list[list[int]]:
    """Row indexes in `n` folds, each category spread evenly over them (shuffled by `seed`)."""
    by_category: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_category.setdefault(str(row["category"]), []).append(i)
    rnd = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(n)]
    for _, indexes in sorted(by_category.items()):
        rnd.shuffle(indexes)
        for j, i in enumerate(indexes):
            out[j % n].append(i)
    return out


def cross_validated(
    rows: Sequence[dict[str, object]], embed: core.Embedder, key: str, budget: float, n: int, seed: int
) -> tuple[dict[tuple[str, str], int], list[str], int]:
    """`run` on each fold, the embedding stage knowing only the other folds' examples."""
    matrix: dict[tuple[str, str], int] = {}
    errors: list[str] = []
    by_embedding = 0
    for held in folds(rows, n, seed):
        held_set = set(held)
        train = core.examples_from_rows([r for i, r in enumerate(rows) if i not in held_set])
        stage = core.EmbeddingStage(train, embed, key, budget=budget)
        why = stage.prepare(600)
        if why:
            raise SystemExit(why)
        m, e, b = run([rows[i] for i in held], Classifier.from_spec(None, stage))
        for cell, count in m.items():
            matrix[cell] = matrix.get(cell, 0) + count
        errors += e
        by_embedding += b
    return matrix, errors, by_embedding


def run(
    rows: Sequence[dict[str, object]], classifier: Classifier, asked: list[float] | None = None
) -> tuple[dict[tuple[str, str], int], list[str], int]:
    """Confusion matrix, misclassified rows and how many the embedding stage decided; `asked` gets the
    wall time (s) of each classification that asked the embedding stage. A row with a `language` also
    counts in the matrix as (`lang:` + language, right or wrong) (see `by_language`)."""
    matrix: dict[tuple[str, str], int] = {}
    errors: list[str] = []
    by_embedding = 0
    for row in rows:
        start = time.perf_counter()
        got = classifier.classify(row["request"])
        if asked is not None and not got.confident:
            asked.append(time.perf_counter() - start)
        by_embedding += got.stage == core.EMBEDDING
        want = str(row["category"])
        matrix[want, got.category.value] = matrix.get((want, got.category.value), 0) + 1
        if "language" in row:
            key = (f"lang:{row['language']}", "right" if got.category.value == want else "wrong")
            matrix[key] = matrix.get(key, 0) + 1
        if got.category.value != want:
            text = json.dumps(row["request"], ensure_ascii=False)[:100]
            errors.append(f"  want {want:6} got {got.category.value:6} [{got.stage}] {text}")
    return matrix, errors, by_embedding


def by_language(matrix: dict[tuple[str, str], int]) -> str:
    """Accuracy per language of the rows that name one ('' when none do)."""
    langs = sorted({w[5:] for w, _ in matrix if w.startswith("lang:")})
    parts = []
    for lang in langs:
        right, wrong = matrix.get((f"lang:{lang}", "right"), 0), matrix.get((f"lang:{lang}", "wrong"), 0)
        parts.append(f"{lang} {100 * right / (right + wrong):.1f}")
    return "  ".join(parts)


def recall(matrix: dict[tuple[str, str], int], cat: str) -> str:
    total = sum(n for (want, _), n in matrix.items() if want == cat)
    return f"{100 * matrix.get((cat, cat), 0) / total:5.1f}" if total else "    -"


@contextlib.contextmanager
def embed_base(kind: str) -> Iterator[tuple[str, str] | None]:
    if kind == "none":
        yield None
        return
    if "#" in kind:
        url, model = kind.split("#", 1)
        yield url, model
        return
    from tests.support.minilm import MODEL_NAME, embedding_server, write_minilm_gguf

    with tempfile.TemporaryDirectory(prefix="routing-bench-") as tmp:
        if kind == "minilm":
            gguf_path, pooling = write_minilm_gguf(Path(tmp) / "minilm.gguf"), None
        else:
            from tests.support.synth import shape_by_name, write_synth_gguf

            gguf_path, pooling = write_synth_gguf(Path(tmp) / "synth-embed.gguf", shape_by_name("mha-f16")), "mean"
        with embedding_server(gguf_path, pooling=pooling) as url:
            yield url, MODEL_NAME


def speed(requests: list[object], classifier: Classifier, seconds: float, rounds: int = 5) -> float:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embed", default="minilm", help="none, minilm, synthetic or URL#MODEL")
    ap.add_argument("--budget", type=float, default=1.0, help="embedding budget per request in the bench (s)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--errors", action="store_true", help="list the misclassified requests")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds on the tune split")
    ap.add_argument("--seed", type=int, default=0, help="how the tune split is shuffled into folds")
    args = ap.parse_args()
    rules = Classifier.from_spec()
    cats = [c.value for c in Category]
    print(
        f"{'set':9} {'classifier':19} {'rows':>5} {'accuracy':>9} {'by rules':>8} {'by emb':>7}  "
        + " ".join(f"{c:>6}" for c in cats)
    )
    with embed_base(args.embed) as base:
        two_stage: Classifier | None = None
        asked: list[float] = []
        embed: core.Embedder = None
        key = ""
        if base is not None:
            url, model = base
            embed = memo(core.openai_embedder(url, model))
            key = f"{url}#{model}"
            stage = core.EmbeddingStage(all_examples(), embed, key, budget=args.budget)
            why = stage.prepare(600)
            if why:
                raise SystemExit(why)
            two_stage = Classifier.from_spec(None, stage)
        for set_name, path in SETS.items():
            rows = load(path)
            results = [("rules only", run(rows, rules))]
            if two_stage is not None and set_name == "tune":
                cv = cross_validated(rows, embed, key, args.budget, args.folds, args.seed)
                results.append((f"two-stage ({args.folds}-fold)", cv))
            elif two_stage is not None:
                results.append(("two-stage", run(rows, two_stage, asked)))
            for label, (matrix, errors, by_emb) in results:
                right = sum(n for (w, g), n in matrix.items() if w == g)
                total = sum(n for (w, _), n in matrix.items() if not w.startswith("lang:"))
                print(
                    f"{set_name:9} {label:19} {total:5d} {100 * right / total:8.1f}% {total - by_emb:8d} {by_emb:7d}  "
                    + " ".join(f"{recall(matrix, c):>6}" for c in cats)
                )
                if by_language(matrix):
                    print(f"{'':9} {'  by language':19} {by_language(matrix)}")
                if args.errors and errors:
                    print("\n".join(errors))
    print(f"(embedding model: {args.embed}; recall in % per expected category)")
    if asked:
        asked.sort()
        over = sum(t > core.EMBEDDING_BUDGET for t in asked)
        median, p95 = 1000 * asked[len(asked) // 2], 1000 * asked[int(len(asked) * 0.95)]
        print(
            f"embedding stage asked {len(asked)} times (held-out and legacy sets, requests not embedded before):"
            f" median {median:.1f} ms, p95 {p95:.1f} ms, {over} over the default budget of"
            f" {1000 * core.EMBEDDING_BUDGET:.0f} ms (this run's budget: {args.budget:g} s)"
        )
    requests = [r["request"] for r in load(SETS["tune"]) + load(SETS["holdout1"]) + load(SETS["holdout2"])]
    text = [r for r in requests if not (isinstance(r, dict) and ("input" in r or '"image' in json.dumps(r)))]
    paste = (
        "Why does this fail?\n```python\n"
        + "\n".join(f"def f{i}(x):\n    return x.get('k{i}') + {i}  # see utils.py:{i}" for i in range(40))
        + "\n```"
    )
    print(f"\nrules only, classifications per CPU second, one core (median of 5 rounds, {args.seconds:g} s in all):")
    batches: list[tuple[str, list[object]]] = [
        ("every row", requests),
        ("text rows", text),
        ("a 2 KB code paste", [paste]),
        ("holdout3 rows", [r["request"] for r in load(SETS["holdout3"])]),
    ]
    for name, batch in batches:
        mean = sum(len(json.dumps(r)) for r in batch) / len(batch)
        print(f"  {name:20} {speed(batch, rules, args.seconds):10,.0f}   (mean {mean:,.0f} characters)")


if __name__ == "__main__":
    main()
