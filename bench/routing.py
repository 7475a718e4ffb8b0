"""Routing classifier: accuracy per labelled set (rules only and rules + embedding), recall, speed.

    python bench/routing.py [--embed none|minilm|synthetic|URL#MODEL] [--seconds 2] [--errors]

Sets: `tune` (the built-in examples, `controller/core/routing_examples.jsonl`: the rules, the
confidence threshold, k and the vote were tuned on it), `holdout1` (written with it, never
looked at while tuning), `holdout2` (written separately, in another style), and `legacy`
(`tests/data/routing.jsonl`, the older set). The two-stage figures on `tune` are
leave-one-out: a request's own example is taken out of its neighbours.

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
    "legacy": ROOT / "tests" / "data" / "routing.jsonl",
}


def load(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class LeaveOneOut(core.EmbeddingStage):
    """The embedding stage without the request's own example among its neighbours."""

    def nearest(self, text: str) -> tuple[tuple[core.Neighbour, ...], str]:
        self.k += 1
        try:
            found, note = super().nearest(text)
        finally:
            self.k -= 1
        return tuple(n for n in found if n.text != text[: core.EMBED_CHARS])[: self.k], note


def run(rows: Sequence[dict[str, object]], classifier: Classifier) -> tuple[dict[tuple[str, str], int], list[str], int]:
    matrix: dict[tuple[str, str], int] = {}
    errors: list[str] = []
    by_embedding = 0
    for row in rows:
        got = classifier.classify(row["request"])
        by_embedding += got.stage == core.EMBEDDING
        want = str(row["category"])
        matrix[want, got.category.value] = matrix.get((want, got.category.value), 0) + 1
        if got.category.value != want:
            text = json.dumps(row["request"], ensure_ascii=False)[:100]
            errors.append(f"  want {want:6} got {got.category.value:6} [{got.stage}] {text}")
    return matrix, errors, by_embedding


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
    args = ap.parse_args()
    rules = Classifier.from_spec()
    cats = [c.value for c in Category]
    print(
        f"{'set':9} {'classifier':16} {'rows':>5} {'accuracy':>9} {'by emb':>7}  " + " ".join(f"{c:>6}" for c in cats)
    )
    with embed_base(args.embed) as base:
        stages: dict[str, Classifier] = {}
        if base is not None:
            url, model = base
            embed = core.openai_embedder(url, model)
            key = f"{url}#{model}"
            for name, cls in (("two-stage", core.EmbeddingStage), ("two-stage LOO", LeaveOneOut)):
                stage = cls(all_examples(), embed, key, budget=args.budget)
                why = stage.prepare(600)
                if why:
                    raise SystemExit(why)
                stages[name] = Classifier.from_spec(None, stage)
        for set_name, path in SETS.items():
            rows = load(path)
            options = [("rules only", rules)]
            if stages:
                options.append(("two-stage" + (" (LOO)" if set_name == "tune" else ""),
                                stages["two-stage LOO" if set_name == "tune" else "two-stage"]))  # fmt: skip
            for label, classifier in options:
                matrix, errors, by_emb = run(rows, classifier)
                right = sum(n for (w, g), n in matrix.items() if w == g)
                total = sum(matrix.values())
                print(
                    f"{set_name:9} {label:16} {total:5d} {100 * right / total:8.1f}% {by_emb:7d}  "
                    + " ".join(f"{recall(matrix, c):>6}" for c in cats)
                )
                if args.errors and errors:
                    print("\n".join(errors))
    print(f"(embedding model: {args.embed}; recall in % per expected category)")
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
    ]
    for name, batch in batches:
        mean = sum(len(json.dumps(r)) for r in batch) / len(batch)
        print(f"  {name:20} {speed(batch, rules, args.seconds):10,.0f}   (mean {mean:,.0f} characters)")


if __name__ == "__main__":
    main()
